"""From a trained federation to recommendations: the saved model (:mod:`.saved`) and
top-K ranking for its users (:mod:`.recommend`)."""
