"""From a trained federation to recommendations (issue 18): the saved model (:mod:`.saved`) and
top-K ranking for its users (:mod:`.recommend`)."""
