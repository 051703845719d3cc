"""One trial: the stages (prune, distil, export, precision plan, evaluate, measure) and the
compression tools beneath them (``compress/``)."""
