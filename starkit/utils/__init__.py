"""Small shared helpers (atomic file writes, image conversion)."""
from .io import atomic_write_bytes, atomic_save_image, images_to_pil
from .checkpoint_io import AtomicCheckpointIO, UnsafeCheckpointError, safe_torch_load
