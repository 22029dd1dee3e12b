"""PyTorch interop: reading .pth / .npz / safetensors files, ImageNet
initialisation, conversion."""
