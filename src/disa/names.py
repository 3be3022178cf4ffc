"""Names the config checks against, declared without torch so that ``disa --help``, ``disa config`` and an input
error never wait for torch to load. The modules that implement them re-export these tuples."""

REWARD_TRANSFORMS = ("raw", "affine", "group")  # disa.estimators.reward_transform
LABEL_ESTIMATORS = ("lse", "cv", "regression_cv")  # disa.label_estimators.log_z_labels
# train.report_to / train.sft.report_to (disa.training.logger): csv is always written; auto = tensorboard if installed
REPORT_TO = ("auto", "none", "csv", "tensorboard", "wandb", "mlflow")
