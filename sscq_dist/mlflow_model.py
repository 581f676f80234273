"""The MLflow pyfunc of a registered SSCQ model, logged as code ("models from code").

MLflow runs this file when it loads the model, so nothing is pickled: the logged model is
this source, the package (code_paths) and plain-file artifacts (registry.write_model_dir).
Never imported by the package itself: `mlflow.models.set_model` runs at import.
"""

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class SSCQModel(PythonModel):
    """Images (N, C, H, W) float32, normalised -> embeddings (N, M*d)."""

    def load_context(self, context):
        from sscq_dist.registry import read_model_dir

        self.model, self.cfg = read_model_dir(context.artifacts["model_dir"])

    # np.ndarray: a hint MLflow accepts without validating (it can only describe list[...]
    # inputs); the logged signature comes from the input example.
    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        import torch

        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.model.embed(x).numpy()


mlflow.models.set_model(SSCQModel())
