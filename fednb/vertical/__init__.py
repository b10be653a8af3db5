"""Vertical federated learning: parties that hold different columns of the same rows train one model.

Pure code, no sockets: rows are aligned by private set intersection
(:mod:`fednb.privacy.psi`), and :mod:`fednb.vertical.logistic` holds the roles of hetero
logistic regression (Hardy et al., 2017) with one method per stage; the round loop carries
their messages. :mod:`fednb.vertical.metrics` scores the joint predictions.
:mod:`fednb.vertical.checkpoint` writes the coordinator's part of a run after every epoch or tree,
and :mod:`fednb.vertical.parts` is what each party keeps of it, so that a run resumes.
"""

from __future__ import annotations

from fednb.vertical.logistic import (
    Arbiter,
    Fitted,
    Guest,
    Host,
    HostForward,
    LogisticConfig,
    combine,
    fit,
    fit_one_vs_rest,
    predict_one_vs_rest,
)
from fednb.vertical.metrics import accuracy, auc, evaluate, ks, logloss

__all__ = [
    "Arbiter",
    "Fitted",
    "Guest",
    "Host",
    "HostForward",
    "LogisticConfig",
    "accuracy",
    "auc",
    "combine",
    "evaluate",
    "fit",
    "fit_one_vs_rest",
    "ks",
    "logloss",
    "predict_one_vs_rest",
]
