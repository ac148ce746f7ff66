"""The cloud model pipeline: convert a model to TFLite, evaluate it with LiteRT, gate it
against its float32 self, and build release artifacts (model, self-test vectors,
drift baseline, manifest fields).

Modules:

* ``sources``      load models (Keras, ``.keras``, SavedModel, ``.tflite``) and datasets
* ``convert``      TFLite conversion in one quantization mode
* ``tflite_info``  ops and quantization read from a flatbuffer
* ``evaluate``     LiteRT evaluation, tensor specs, the device-runtime op check
* ``gate``         ``run_pipeline``: reference, gate, fallback chain
* ``artifacts``    ``build_artifacts`` and ``make_manifest``
* ``digits``       the demo dataset and CNN

Importing this package does not import TensorFlow; the functions that need it
import it when called.
"""

__all__ = ["artifacts", "convert", "digits", "evaluate", "gate", "sources", "tflite_info"]
