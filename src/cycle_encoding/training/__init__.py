"""Training: the trainer skeleton (``trainer``) and the encoder, generator and classifier trainers filled into it, the
cycle schedule as data (``schedule``), the plateau rule (``plateau``) and run folders (``runs``)."""
