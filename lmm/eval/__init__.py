"""Benchmark scorers (pure Python: no torch import anywhere under ``lmm.eval``, except
``lmm.eval.lmms_eval_model``, the optional lmms-eval adapter, which only lmms-eval imports).

One module per benchmark (``pope``, ``vqa``, ``gqa``, ``scienceqa``, ``mme``,
``mmbench``, ``mmstar``, ``seedbench``, ``short_answer``, ``chair``); :mod:`lmm.eval.registry`
maps benchmark names to them and :mod:`lmm.commands.score` is the ``python -m lmm score``
command. ``ranking`` (AUC-ROC) and ``choices`` (the option letters a question shows) serve
likelihood-scored answers (``lmm.inference.likelihood``).

The shared reading and matching of prediction files is :mod:`lmm.eval.predictions`.

Conventions shared by all scorers:

* accuracies, precisions etc. are fractions in [0, 1] (MME's scores keep their
  official 0-200-per-subtask scale);
* a question with no usable prediction counts as answered wrongly and is
  reported as ``missing``;
* a malformed prediction line (bad JSON, not an object, no ``question_id``, no
  string ``text``) is skipped and reported as ``malformed``;
* a prediction whose id matches no annotation is reported as ``unknown``;
* when several predictions hit the same question the last one wins (as in
  LLaVA's ``{p["question_id"]: p for p in ...}``) and the extra ones are
  reported as ``duplicates``.
"""
