"""Pallas kernels of kvjax (imported as `kvjax.pallas_kernels`)."""

from kvjax.pallas_kernels.quantize_pack import quantize_pack, quantize_pack_reference
