"""MLflow "models from code" entry point of the logged model; MLflow runs it, nobody imports it.

``pipeline.track.tracking.log_pyfunc_model`` logs this file as the model's code. When a model is loaded
(``mlflow.pyfunc.load_model("models:/NAME@alias")``), MLflow executes the stored copy of this file,
which declares the pyfunc model; its ``load_context`` then rebuilds the network with
``models.create_model`` from the JSON spec and loads the safetensors weights
(``pipeline.track.packaging.Predictor.from_files``). Nothing is unpickled. The project (``pipeline``,
``models``) must be importable where the model is loaded.
"""

from pipeline.track.tracking import set_pyfunc_model

set_pyfunc_model()
