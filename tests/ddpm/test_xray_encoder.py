"""XrayEncoder token order: AP tokens first, then LAT, each row-major over the token grid; token_maps inverts it.

The footprint mask and back-projection index X-ray tokens in exactly this order."""

from __future__ import annotations

import torch

from ddpm import XrayEncoder

ROWS, COLS = 2, 3  # token grid of an 8 x 12 image in 4 x 4 patches: not square, so row- and column-major differ


def _marker_encoder() -> XrayEncoder:
    """No transformer blocks, no position or view embedding; channel 0 of a token is the mean of its patch
    (in [-1, 1]), the other channels are zero. The final LayerNorm keeps that channel's sign."""
    enc = XrayEncoder(image_size=(8, 12), patch_size=4, dim=8, depth=0, num_heads=2)
    with torch.no_grad():
        enc.patch_embed.weight.zero_()
        enc.patch_embed.weight[0, 0] = 1.0 / 16
        enc.patch_embed.bias.zero_()
        enc.pos_embed.zero_()
        enc.view_embed.zero_()
    return enc


def _marked(row: int, col: int) -> torch.Tensor:
    """(1, 1, 8, 12) black image with the 4 x 4 patch of token (row, col) white."""
    img = torch.zeros(1, 1, 8, 12)
    img[..., 4 * row:4 * row + 4, 4 * col:4 * col + 4] = 1.0
    return img


def test_tokens_are_ap_then_lat_each_row_major() -> None:
    enc = _marker_encoder()
    assert enc.grid_hw == (ROWS, COLS) and enc.num_tokens == 12
    tokens, _ = enc(_marked(1, 2), _marked(0, 1))
    assert tokens.shape == (1, 12, 8)
    lit = torch.nonzero(tokens[0, :, 0] > 0).flatten().tolist()
    # AP marker at (row 1, col 2) -> token 1 * 3 + 2; LAT marker at (0, 1) -> token 6 + 0 * 3 + 1
    assert lit == [5, 7]


def test_token_maps_put_each_marker_back_on_its_patch() -> None:
    enc = _marker_encoder()
    tokens, _ = enc(_marked(0, 2), _marked(1, 0))
    ap_map, lat_map = enc.token_maps(tokens)
    assert ap_map.shape == lat_map.shape == (1, 8, ROWS, COLS)
    assert torch.nonzero(ap_map[0, 0] > 0).tolist() == [[0, 2]]
    assert torch.nonzero(lat_map[0, 0] > 0).tolist() == [[1, 0]]


def test_token_maps_is_the_inverse_of_the_token_order() -> None:
    enc = _marker_encoder()
    tokens = torch.arange(12, dtype=torch.float32).reshape(1, 12, 1).expand(2, 12, 3)  # token value = its index
    ap_map, lat_map = enc.token_maps(tokens)
    expected = torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
    for c in range(3):
        torch.testing.assert_close(ap_map[1, c], expected, rtol=0, atol=0)
        torch.testing.assert_close(lat_map[1, c], expected + 6, rtol=0, atol=0)


def test_patch_embedding_is_the_strided_convolution_with_its_gradients() -> None:
    from ddpm.xray_encoder import PatchConv2d

    g = torch.Generator().manual_seed(0)
    for channels, patch, hw in [(1, 4, (8, 12)), (3, 2, (6, 4))]:
        conv = PatchConv2d(channels, 5, patch, stride=patch).double()
        x = torch.randn(2, channels, *hw, generator=g, dtype=torch.float64, requires_grad=True)
        torch.testing.assert_close(conv(x), torch.nn.functional.conv2d(x, conv.weight, conv.bias, patch))
        assert torch.autograd.gradcheck(lambda x, w, b: conv._conv_forward(x, w, b), (x, conv.weight, conv.bias))
    odd = PatchConv2d(1, 5, 4, stride=4)  # 10 x 10 does not split into 4 x 4 patches: the convolution's own result
    x = torch.randn(1, 1, 10, 10, generator=g)
    torch.testing.assert_close(odd(x), torch.nn.functional.conv2d(x, odd.weight, odd.bias, 4))
    assert isinstance(XrayEncoder(image_size=(8, 12), patch_size=4, dim=8, depth=0, num_heads=2).patch_embed, PatchConv2d)
