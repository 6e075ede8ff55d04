"""Network shapes and weight counts (SCIENCE.md sec. 5)."""

import pytest
import torch

from clustermass.errors import ConfigError
from clustermass.networks import CNN3D, build_network, count_parameters, input_shape


def test_cnn3d_default_is_authors_architecture_at_50():
    net = build_network("cnn3d", 50)
    assert count_parameters(net) == 123_189
    convs = [m for m in net.features if isinstance(m, torch.nn.Conv3d)]
    assert [(c.out_channels, c.kernel_size[0]) for c in convs] == [(12, 5), (8, 3), (4, 1)]
    assert all(c.padding == (0, 0, 0) and c.stride == (1, 1, 1) for c in convs)
    # valid convs + ceil ('same') pooling: 50 -> 46 -> 23 -> 21 -> 11 -> 11 -> 6
    x = torch.zeros(1, 1, 50, 50, 50)
    sizes = []
    for m in net.features:
        x = m(x)
        if x.dim() == 5 and not isinstance(m, torch.nn.ReLU):
            sizes.append(x.shape[-1])
    assert sizes == [46, 23, 21, 11, 11, 6]
    assert net.n_features == 4 * 6**3
    linears = [m for m in net.head if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [128, 64, 1]
    assert not any(isinstance(m, torch.nn.ReLU) for m in net.head)  # linear dense layers


@pytest.mark.parametrize("kind,n", [("cnn3d", 50), ("cnn3d", 32), ("cnn3d", 16), ("cnn2d", 50),
                                    ("cnn2d", 16), ("cnn1d", 50), ("cnn1d", 12)])
def test_output_shape(kind, n):
    net = build_network(kind, n)
    x = torch.rand((3,) + input_shape(kind, n))
    out = net(x)
    assert out.shape == (3,)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_grid_adaptation_changes_only_the_first_dense_layer():
    n50, n32 = count_parameters(build_network("cnn3d", 50)), count_parameters(build_network("cnn3d", 32))
    # 32: 28 -> 14 -> 12 -> 6 -> 6 -> 3; 4*27 = 108 features into Dense(128)
    assert n50 - n32 == (864 - 108) * 128


def test_configurable_filters_and_kernels():
    net = CNN3D(50, kernels=(5, 5, 5), filters=(12, 8, 4))
    # 50 -> 46 -> 23 -> 19 -> 10 -> 6 -> 3: 108 features
    expected = (12 * 125 + 12) + (8 * 12 * 125 + 8) + (4 * 8 * 125 + 4) + (108 * 128 + 128) + (128 * 64 + 64) + 65
    assert count_parameters(net) == expected
    assert net(torch.rand(2, 1, 50, 50, 50)).shape == (2,)


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match="too small"):
        build_network("cnn3d", 8)
    with pytest.raises(ConfigError, match="unknown model kind"):
        build_network("cnn4d", 16)
    with pytest.raises(ConfigError, match="unknown architecture"):
        build_network("cnn3d", 16, filterz=(1, 2, 3))
    with pytest.raises(ConfigError, match="equal length"):
        build_network("cnn2d", 16, filters=(4, 4), kernels=(3,))


def test_output_is_destandardised_log_mass():
    torch.manual_seed(0)
    a = build_network("cnn2d", 16)
    b = build_network("cnn2d", 16, target_mean=14.3, target_std=0.4)
    b.load_state_dict({**a.state_dict(), "target_mean": torch.tensor(14.3), "target_std": torch.tensor(0.4)})
    x = torch.rand(4, 1, 16, 16)
    torch.testing.assert_close(b(x), 14.3 + 0.4 * a(x))
    assert count_parameters(a) == count_parameters(b)  # buffers are not weights
