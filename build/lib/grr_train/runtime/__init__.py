"""Where code runs: processes and collectives (distributed), what is done to the model for them
(DDP or FSDP2, compile: parallel), autocast (precision) and the device (device)."""
