"""The integer helpers the launchers size their grids and tiles with (``kernels._common``)."""
import torch

from tec_fast.kernels._common import cdiv, next_pow2, persistent_programs


def test_cdiv_is_the_ceiling_of_the_quotient():
    for a in range(0, 70):
        for b in (1, 2, 3, 16, 64):
            assert cdiv(a, b) == -(-a // b) == (a + b - 1) // b


def test_next_pow2_is_the_smallest_power_of_two_not_below():
    assert [next_pow2(n) for n in (0, 1, 2, 3, 4, 5, 16, 17, 1000, 1024)] == [1, 1, 2, 4, 4, 8, 16, 32, 1024, 1024]


def test_persistent_programs_off_the_gpu_never_exceed_the_work():
    cpu = torch.device("cpu")
    assert [persistent_programs(w, cpu) for w in (0, 1, 2, 3, 4, 5, 100)] == [1, 1, 2, 3, 4, 4, 4]


def test_relation_kernels_take_up_to_128_query_rows_and_head_dim_256():
    """The limits the relation kernels' register tiles set: 1 + topk <= 128, d <= 256."""
    from tec_fast.kernels import relation_loss, relation_targets
    for mod in (relation_targets, relation_loss):
        assert mod.not_supported_reasons(torch.float32, (2, 3, 200, 256), topk=127) == []
        assert any("rows" in r for r in mod.not_supported_reasons(torch.float32, (2, 3, 200, 64), topk=128))
        assert any("head dim" in r for r in mod.not_supported_reasons(torch.float32, (2, 3, 200, 257), topk=3))
