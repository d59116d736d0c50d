"""``hmt serve``: the HTTP server over the scheduler.  Stands on model and below."""
