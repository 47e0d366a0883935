"""The student is built by `models.factory` (the one model builder); these names stay for the
callers that still import them from here."""
from sentijax.models.factory import (ModelSpec, model_config, param_initializer,  # noqa: F401
                                     tokenizer)
