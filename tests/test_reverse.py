"""reverse=True: one direction backward in time, checked against torch's bidirectional
reverse half (outputs, final states, every gradient) and the gradcheck oracle."""

import numpy as np
import pytest

import fastrnn
from conftest import LAYERS, TORCH_KINDS, make_layer, torch_class, torch_or_skip


@pytest.mark.parametrize("kind", TORCH_KINDS)
def test_reverse_equals_torch_reverse_half(backend, kind):
    torch = torch_or_skip()
    rng = np.random.default_rng(31)
    T, B, I, H = 6, 3, 4, 5
    lengths = np.array([6, 2, 4])
    m = make_layer(kind, I, H, reverse=True, backend=backend, dtype=np.float64, seed=3)
    cls, extra = torch_class(torch, kind)
    t = cls(I, H, bidirectional=True, **extra).double()
    sd = {k: torch.from_numpy(v.astype(np.float64)) for k, v in m.state_dict().items()}
    sd.update({k + "_reverse": v for k, v in sd.items()})
    t.load_state_dict(sd)
    x = rng.standard_normal((T, B, I))
    w = rng.standard_normal((T, B, H))
    out, h_n = m(x, lengths=lengths)
    d_x, _ = m.backward(w)

    xt = torch.tensor(x, requires_grad=True)
    packed = torch.nn.utils.rnn.pack_padded_sequence(xt, torch.tensor(lengths),
                                                     enforce_sorted=False)
    o, sn = t(packed)
    o, _ = torch.nn.utils.rnn.pad_packed_sequence(o, total_length=T)
    (o[:, :, H:] * torch.tensor(w)).sum().backward()
    np.testing.assert_allclose(out, o[:, :, H:].detach().numpy(), rtol=1e-10, atol=1e-12)
    h_t = (sn[0] if kind == "lstm" else sn)[1]
    np.testing.assert_allclose((h_n[0] if kind == "lstm" else h_n)[0], h_t.detach().numpy(),
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(d_x, xt.grad.numpy(), rtol=1e-9, atol=1e-11)
    for name, g in m.grads.items():
        np.testing.assert_allclose(g, t.get_parameter(name + "_reverse").grad.numpy(),
                                   rtol=1e-9, atol=1e-11, err_msg=name)


def test_reverse_gradcheck_two_layers(backend):
    m = make_layer("gru_reset_before", 3, 4, num_layers=2, reverse=True, backend=backend,
                   dtype=np.float64, seed=0)
    x = np.random.default_rng(0).standard_normal((5, 2, 3))
    assert fastrnn.gradcheck(m, x, lengths=[5, 3]).passed


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_reverse_rejects_bidirectional(kind):
    with pytest.raises(ValueError, match="reverse"):
        make_layer(kind, 3, 4, reverse=True, bidirectional=True)
    with pytest.raises(TypeError, match="reverse"):
        make_layer(kind, 3, 4, reverse="yes")
