"""`grr demo`: the whole path on the shapes set (run), its training jobs (jobs) and its report."""
