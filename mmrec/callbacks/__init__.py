"""Lightning callbacks that any training stage can take (``--trainer.callbacks+ ...``)."""
