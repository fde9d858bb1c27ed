"""Evaluation: text metrics (`metrics`), held-out examples as training lays them out
(`examples`), teacher-forced perplexity (`perplexity`), generation metrics (`generation`),
multiple-choice scoring (`choices`), and `run.evaluate` over a checkpoint and a file."""
