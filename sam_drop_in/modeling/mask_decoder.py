from typing import List, Optional, Tuple, Type

import torch
from torch import nn
from torch.nn import functional as F

from .common import LayerNorm2d, activate_, eager_inference
from .transformer import PROMPT_CHUNK, ImageSide


class MaskDecoder(nn.Module):
    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        activation: Type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        """
        Predicts masks from an image embedding and prompt embeddings with a two-way transformer.

        Arguments:
          transformer_dim (int): channel width of the transformer (256).
          transformer (nn.Module): the TwoWayTransformer.
          num_multimask_outputs (int): masks predicted for ambiguous prompts (3).
          activation (nn.Module): activation used when upscaling masks.
          iou_head_depth (int), iou_head_hidden_dim (int): the mask-quality MLP.
        """
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        *,
        image_side: Optional[ImageSide] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Arguments:
          image_embeddings (torch.Tensor): 1xCxHxW (shared by all prompts) or BxCxHxW (one per prompt).
          image_pe (torch.Tensor): 1xCxHxW positional encoding of the embedding grid.
          sparse_prompt_embeddings (torch.Tensor): BxNxC point and box embeddings.
          dense_prompt_embeddings (torch.Tensor): BxCxHxW mask embeddings.
          multimask_output (bool): return the 3 ambiguity-aware masks instead of the single one.
          image_side (ImageSide or None): :meth:`prepare_image` of the same three image inputs,
            kept by a caller that decodes several batches of prompts on one image.

        Returns:
          (torch.Tensor): mask logits Bx(3 or 1)x(4H)x(4W).
          (torch.Tensor): predicted mask quality Bx(3 or 1).
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=image_pe,
            sparse_prompt_embeddings=sparse_prompt_embeddings,
            dense_prompt_embeddings=dense_prompt_embeddings,
            image_side=image_side,
        )
        mask_slice = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, mask_slice], iou_pred[:, mask_slice]

    def _image_source(self, image_embeddings: torch.Tensor, dense_prompt_embeddings: torch.Tensor) -> torch.Tensor:
        dense = dense_prompt_embeddings
        if dense.shape[0] > 1 and dense.stride(0) == 0:
            # The prompt encoder's 'no mask' embedding is one vector expanded over the batch:
            # keep it shared so the image side is computed once, not once per prompt.
            dense = dense[:1]
        return image_embeddings + dense  # 1xCxHxW when everything is shared, else BxCxHxW

    def prepare_image(
        self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, dense_prompt_embeddings: torch.Tensor
    ) -> ImageSide:
        """
        The prompt-independent part of decoding, to pass as ``image_side`` for any number of
        prompt batches on the same image (valid while the weights and these inputs are unchanged).

        Arguments:
          image_embeddings (torch.Tensor): 1xCxHxW image embedding.
          image_pe (torch.Tensor): 1xCxHxW positional encoding.
          dense_prompt_embeddings (torch.Tensor): 1xCxHxW (or stride-0 expanded) dense embedding.
        """
        return self.transformer.prepare_image(self._image_source(image_embeddings, dense_prompt_embeddings), image_pe)

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        *,
        image_side: Optional[ImageSide] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """All mask tokens' logits Bx4x(4H)x(4W) and quality scores Bx4."""
        hs, src, (h, w) = self.decode_tokens(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, image_side=image_side
        )
        iou_pred = self.iou_prediction_head(hs[:, 0, :])
        return self.mask_logits(hs, src, h, w), iou_pred

    def decode_tokens(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        *,
        image_side: Optional[ImageSide] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, Tuple[int, int]]:
        """
        The two-way transformer's outputs, before any mask is upscaled.

        Returns:
          (torch.Tensor): output tokens BxTxC (token 0 feeds ``iou_prediction_head``, tokens 1..4
            the hypernetworks).
          (torch.Tensor): image tokens BxHWxC.
          (tuple(int, int)): the embedding grid (H, W).
        """
        b = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings), dim=1)

        if image_embeddings.shape[0] not in (1, b):
            raise ValueError(
                f"image_embeddings has batch {image_embeddings.shape[0]} but there are {b} prompts; "
                "give one embedding shared by all prompts or one per prompt."
            )
        src = self._image_source(image_embeddings, dense_prompt_embeddings)
        hs, keys = self.transformer(src, image_pe, tokens, image_side=image_side)
        return hs, keys, (src.shape[2], src.shape[3])

    def mask_logits(self, hs: torch.Tensor, keys: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """
        Bx4x(4H)x(4W) mask logits from the transformer's output tokens ``hs`` (BxTxC) and image
        tokens ``keys`` (BxHWxC).
        """
        mask_tokens_out = hs[:, 1 : (1 + self.num_mask_tokens), :]
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        if not self._upscaling_is_standard():
            upscaled = self.output_upscaling(keys.transpose(1, 2).reshape(keys.shape[0], -1, h, w))
            _, c_up, h_up, w_up = upscaled.shape
            return (hyper_in @ upscaled.view(-1, c_up, h_up * w_up)).view(-1, hyper_in.shape[1], h_up, w_up)
        step = PROMPT_CHUNK if eager_inference() else max(keys.shape[0], 1)
        return torch.cat([
            self._upscaled_logits(keys[i : i + step], hyper_in[i : i + step], h, w)
            for i in range(0, max(keys.shape[0], 1), step)  # one (empty) group when there are no prompts
        ])

    def _upscaling_is_standard(self) -> bool:
        mods = list(self.output_upscaling)
        if len(mods) != 5 or not isinstance(mods[1], LayerNorm2d):
            return False
        convs = (mods[0], mods[3])
        return all(
            type(c) is nn.ConvTranspose2d and c.kernel_size == (2, 2) and c.stride == (2, 2)
            and c.padding == (0, 0) and c.output_padding == (0, 0) and c.dilation == (1, 1)
            and c.groups == 1 and c.bias is not None
            for c in convs
        )

    def _upscaled_logits(self, keys: torch.Tensor, hyper_in: torch.Tensor, h: int, w: int) -> torch.Tensor:
        # A 2x2 stride-2 transposed convolution writes each input pixel's 2x2 output block and
        # nothing else, so it is one matrix product per pixel: channels-last input rows times a
        # C_in x (2*2*C_out) matrix. Both upscaling steps run that way on the image tokens as
        # they come out of the transformer (no transposes), the LayerNorm over the last axis; the
        # sub-pixel blocks are put in place once, on the small final logits.
        conv1, norm, act1, conv2, act2 = self.output_upscaling
        b = keys.shape[0]
        c1, c2 = conv1.out_channels, conv2.out_channels
        w1 = conv1.weight.permute(0, 2, 3, 1).reshape(conv1.in_channels, 4 * c1)  # cin x (di, dj, cout)
        x = torch.matmul(keys, w1).view(b, h * w * 4, c1).add_(conv1.bias)
        x = activate_(act1, nn.functional.layer_norm(x, (c1,), norm.weight, norm.bias, norm.eps))
        w2 = conv2.weight.permute(0, 2, 3, 1).reshape(c1, 4 * c2)
        x = activate_(act2, torch.matmul(x, w2).view(b, h * w * 16, c2).add_(conv2.bias))
        logits = torch.matmul(x, hyper_in.transpose(1, 2))  # B x (h, w, di, dj, di2, dj2) x K
        k = hyper_in.shape[1]
        logits = logits.view(b, h, w, 2, 2, 2, 2, k).permute(0, 7, 1, 3, 5, 2, 4, 6)
        return logits.reshape(b, k, 4 * h, 4 * w)


class MLP(nn.Module):
    """Plain MLP with ReLU between layers (keys ``layers.N``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int,
                 sigmoid_output: bool = False) -> None:
        super().__init__()
        self.num_layers = num_layers
        dims: List[int] = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + dims, dims + [output_dim]))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return torch.sigmoid(x) if self.sigmoid_output else x
