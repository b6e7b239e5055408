"""``hmlib cluster``: cluster a folder of images, a parquet mirror folder or a hub dataset with a trained model.

Input side (:mod:`hmlib.cluster.images`), contact sheet (:mod:`hmlib.cluster.sheet`), output files
(:mod:`hmlib.cluster.outputs`) and the command (:mod:`hmlib.cluster.command`); the model side lives in
:mod:`hmlib.cluster.estimator`.
"""
