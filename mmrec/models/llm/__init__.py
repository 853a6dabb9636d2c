"""The LLM recommender with MME-SID's frequency-aware fusion head.

One module a job: ``backbone`` loads the causal LM (and a tiny one for tests), ``lora`` adds the adapter,
``prompt`` builds the chat prompt around the history's item vectors, ``item_encoder`` turns an item into
one input vector, ``fusion`` scores every item, ``distill`` lets SASRec teach it while it trains, and
``recommender`` is the LightningModule that joins them (plus ``load`` for ``mmrec test``). ``throughput``
measures training speed and memory.
"""
