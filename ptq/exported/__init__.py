"""Read an exported (unified Hugging Face) checkpoint back into a model that computes what it stores.

Serving engines run these checkpoints with low-precision kernels; transformers cannot load them. To score
the file that was actually written (and to score checkpoints this process did not quantize, such as the
Megatron-Bridge backend's), every quantized linear layer gets its weight dequantized from the stored
integers/FP8/FP4 codes and scales, and a hook that applies the stored pre-quantization scale and quantizes
its input with the stored activation scale. Computation then runs in ordinary precision, so the numbers
match the quantized model up to rounding of the compute dtype. FP8 and INT8 weights are a code times its
scale; NVFP4 weights and activations are unpacked and rounded here with the arithmetic of ModelOpt's
NVFP4QTensor (tested bit for bit against it); the INT4 export packs two output rows per byte, which no
ModelOpt class reads back, so that unpacking is done here (and tested against ModelOpt's packer). The model
is built on its device directly and every layer is dequantized there (on a GPU: seconds for an 8B model).

`check_stored_weights` is a much cheaper check of the same file: each quantized layer's stored weight against
the source checkpoint's, on a few rows; it catches a wrong weight scale but does not measure the model.

Not simulated (reported in the summary): KV-cache scales (they apply inside attention after the rotary
embedding, which a hook on the projections cannot reproduce).

- dequantize.py: the formats' arithmetic (INT4/FP4 unpacking, FP8/INT8/NVFP4 quantization, dequantized weights,
  input transforms).
- reading.py: the export's quantization config, tensor files and tensors.
- simulation.py: the read-back (`load_exported`, `simulate`).
- stored_weights.py: `check_stored_weights`.
"""

from ptq.exported.dequantize import (
    dequantize_weight,
    fp8_fake_quant,
    input_transform,
    int8_fake_quant,
    nvfp4_fake_quant,
    unpack_fp4,
    unpack_int4,
)
from ptq.exported.reading import layer_formats, read_quant_config, read_tensors, tensor_files, unreadable_formats
from ptq.exported.simulation import Simulation, load_exported, simulate
from ptq.exported.stored_weights import check_stored_weights

__all__ = [
    "Simulation",
    "check_stored_weights",
    "dequantize_weight",
    "fp8_fake_quant",
    "input_transform",
    "int8_fake_quant",
    "layer_formats",
    "load_exported",
    "nvfp4_fake_quant",
    "read_quant_config",
    "read_tensors",
    "simulate",
    "tensor_files",
    "unpack_fp4",
    "unpack_int4",
    "unreadable_formats",
]
