"""fp16 weights and math for GPU targets, with fp32 inputs and outputs kept.

Uses ONNX Runtime's own converter (``onnxruntime.transformers.float16``, the
one its transformer optimiser uses), so no extra package is needed. The model
keeps fp32 I/O (``keep_io_types``): the manifest signature and every client
stay the same, and Cast nodes at the edges do the conversion. On a CPU the
result is slower than fp32 (no fp16 kernels), so it is verified here only for
loading and for close outputs; its speed is a GPU figure.

NOTE: torch-free.
"""

from __future__ import annotations

import logging
from pathlib import Path

from common.errors import InvalidInputError

logger = logging.getLogger(__name__)

FP16 = "fp16"


def convert_fp16(fp32_path: Path, out: Path) -> Path:
    """Write an fp16 copy of ``fp32_path`` with fp32 inputs and outputs."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(fp32_path))
    try:
        half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    except Exception as exc:  # the converter raises plain errors on graphs it cannot handle
        raise InvalidInputError(f"cannot convert {fp32_path} to fp16: {exc}") from exc
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(half, str(out))
    logger.info("fp16 %s -> %s (%d bytes)", fp32_path, out, out.stat().st_size)
    return out
