import copy

import torch

from robustkd.data import Batch
from robustkd.methods import create_objective


def test_introspection_term_backpropagates_through_the_clean_prediction(small_models, tiny_batch):
    """Official IAD-I: KL(p_s(x) || p_s(x')) keeps p_s(x) in the graph; detaching is an option."""
    student, teacher = small_models
    x, y, *_ = tiny_batch
    twin = copy.deepcopy(student)
    grads = []
    for model, detach in ((student, False), (twin, True)):
        obj = create_objective("iad", {"steps": 1, "introspection_start_epoch": 0,
                                       "detach_introspection_target": detach})
        loss, parts = obj(model, teacher, Batch(x, y), epoch=0, generator=torch.Generator().manual_seed(1))
        assert parts["introspection"] > 0
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert not torch.allclose(grads[0], grads[1])


def test_before_the_start_epoch_iad_is_kd_only(small_models, tiny_batch):
    student, teacher = small_models
    x, y, *_ = tiny_batch
    obj = create_objective("iad", {"steps": 1, "introspection_start_epoch": 5})
    _, parts = obj(student, teacher, Batch(x, y), epoch=4)
    assert parts["introspection"] == 0
