"""Transcriptions of the baselines' OFFICIAL training steps (attack + loss), for parity tests.

Each function below reproduces, statement by statement, what the official training script
computes for one mini-batch: the train/eval switches, the random start (the first gradient is
taken at the unclamped ``x + noise``; projection only after each step), every forward pass of the
student in its official order (so batch-norm running statistics move exactly as there), the
official reductions and temperatures, and the dataset branches. The ONLY change is that the
random start noise is an argument (``start_noise``, a tensor shaped like ``x``) instead of a
fresh ``torch.rand``/``torch.randn`` draw, and ``.cuda()`` is dropped.

Official deprecated arguments are written in their modern equivalents:
``nn.KLDivLoss(size_average=False)`` == ``reduction='sum'``; ``nn.KLDivLoss(reduce=False)`` ==
``reduction='none'``; ``nn.KLDivLoss()`` == ``reduction='mean'`` (mean over batch x classes);
``F.cross_entropy(..., size_average=False)`` == ``reduction='sum'``; ``Variable(t,
requires_grad=False)`` == ``t.detach()``.

Conventions: the student arrives in train mode (each official loop calls ``net.train()`` /
``student.train()`` before its batches) and is left in the mode the official code leaves it
(train mode, for all five). The teacher is in eval mode throughout and its parameters are frozen
by the caller (ARD and IAD set ``requires_grad = False`` on them; RSLAD runs it under
``no_grad``). Each function returns the scalar loss on which the official code calls
``.backward()``.

The transcriptions deliberately keep the official code's shape (variable names, the
per-sample Python loop of IAD); see docs/official-baselines.md for the surrounding recipes.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["official_trades_loss", "official_ard_loss", "official_iad1_loss",
           "official_rslad_loss", "official_adaad_loss", "COMMITS"]

COMMITS = {
    "trades": ("yaodongyu/TRADES", "6e8e11b7c281371c2f027ffadfbaea80361f09de"),
    "ard": ("goldblum/AdversariallyRobustDistillation", "779ade36d612bddb0a5a705fdd74efe7571a1381"),
    "iad": ("ZFancy/IAD", "a8091a8c7552cef43d8f3f28085426cb786ce9d3"),
    "rslad": ("zibojia/RSLAD", "c40e04f6c4edcd87431d0250b168d503b1293745"),
    "adaad": ("boyellow/AdaAD", "9e5c6e5ff73052af196065439517562d37eff6e6"),
}


def _kl_mean(log_q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``nn.KLDivLoss()(log_q, p)``: the default reduction, mean over batch x classes.
    (Modern PyTorch warns that 'mean' is not 'batchmean'; the official code used it anyway.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nn.KLDivLoss()(log_q, p)


def _pgd_ce_train_mode(basic_net, inputs, targets, start_noise, epsilon, step_size, num_steps):
    """``AttackPGD.forward`` of ARD (main.py L60-79) and IAD (IAD-I.py L87-106), identical in both.
    The student is in whatever mode the caller left it (train mode in both training loops)."""
    x = inputs.detach()
    x = x + start_noise                                   # official: torch.zeros_like(x).uniform_(-eps, eps)
    for _ in range(num_steps):
        x.requires_grad_()
        with torch.enable_grad():
            loss = F.cross_entropy(basic_net(x), targets, reduction="sum")
        grad = torch.autograd.grad(loss, [x])[0]
        x = x.detach() + step_size * torch.sign(grad.detach())
        x = torch.min(torch.max(x, inputs - epsilon), inputs + epsilon)
        x = torch.clamp(x, 0.0, 1.0)
    return basic_net(x), x


# ---------------------------------------------------------------------------------------- TRADES
def official_trades_loss(model, x_natural, y, start_noise, steps=10, epsilon=0.031, step_size=0.007,
                         beta=6.0):
    """TRADES, yaodongyu/TRADES @ 6e8e11b7c281371c2f027ffadfbaea80361f09de,
    ``trades.py`` L17-41 (attack, l_inf branch) and L73-84 (loss); called from
    ``train_trades_cifar10.py`` L73-90 (model.train() per epoch; eps 0.031, step 0.007, 10 steps,
    beta 6.0 at L30-37).

    Attack in eval mode, maximising sum-KL(p(x) || p(x_adv)) from x + 0.001 N(0,1) (unclamped).
    Loss in train mode: CE(f(x), y) + beta * (1/B) * sum-KL(p(x) || p(x_adv)), the target p(x)
    NOT detached, and three train-mode forwards in this order: x, x_adv, x (BN stats move 3x).
    Leaves the model in train mode.
    """
    criterion_kl = nn.KLDivLoss(reduction="sum")          # size_average=False
    model.eval()
    batch_size = len(x_natural)
    x_adv = x_natural.detach() + start_noise.detach()     # 0.001 * torch.randn(x_natural.shape)
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = criterion_kl(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x_natural), dim=1))
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    logits = model(x_natural)
    loss_natural = F.cross_entropy(logits, y)
    loss_robust = (1.0 / batch_size) * criterion_kl(F.log_softmax(model(x_adv), dim=1),
                                                    F.softmax(model(x_natural), dim=1))
    return loss_natural + beta * loss_robust


# ------------------------------------------------------------------------------------------- ARD
def official_ard_loss(student, teacher, inputs, targets, start_noise, steps=10, epsilon=8 / 255,
                      step_size=2 / 255, temp=30.0, alpha=1.0):
    """ARD, goldblum/AdversariallyRobustDistillation @ 779ade36d612bddb0a5a705fdd74efe7571a1381,
    ``main.py`` L60-79 (AttackPGD), L100-104 (eps 8/255, 10 steps of 2/255), L113-114 (losses),
    L117-129 (train step; temp 30, alpha 1 from L23, L26).

    The student stays in TRAIN mode through the attack (``net.train()`` at L118): every attack
    forward updates BN running statistics. Uniform start, unclamped first gradient. After the
    attack: train-mode forward on x_adv (inside AttackPGD), teacher on x, and a train-mode forward
    of the student on x that is always run (even with alpha = 1, where its CE term is multiplied
    by 0). KL: ``nn.KLDivLoss()`` = mean over batch x classes, times alpha T^2.
    """
    student.train()
    outputs, pert_inputs = _pgd_ce_train_mode(student, inputs, targets, start_noise, epsilon, step_size,
                                              steps)
    teacher_outputs = teacher(inputs)
    basic_outputs = student(inputs)
    loss = (alpha * temp * temp * _kl_mean(F.log_softmax(outputs / temp, dim=1),
                                           F.softmax(teacher_outputs / temp, dim=1))
            + (1.0 - alpha) * F.cross_entropy(basic_outputs, targets))
    return loss


# ----------------------------------------------------------------------------------------- IAD-I
def official_iad1_loss(student, teacher, inputs, targets, start_noise, epoch, steps=10, epsilon=8 / 255,
                       step_size=2 / 255, temp=1.0, alpha=1.0, beta=0.1, begin=60):
    """IAD-I, ZFancy/IAD @ a8091a8c7552cef43d8f3f28085426cb786ce9d3, ``IAD-I.py`` L87-106
    (AttackPGD, as ARD's), L135-139 (eps 8/255, 10 x 2/255), L152-153 (losses), L156-186 (train
    step; temp 1.0, alpha 1.0, beta 0.1, begin 60 from L26, L29, L34-35).

    Student in train mode throughout (attack included). Forwards of the student, in order: the
    attack's steps and final x_adv forward, an extra ``basic_net(pert_inputs).detach()`` (unused,
    but BN statistics move), then from ``epoch >= begin``: ``basic_net(inputs)`` for the
    introspection target (NOT detached: the gradient flows through p_s(x)) and another
    ``basic_net(inputs)`` for the (1 - alpha) CE term; before ``begin`` only the latter.
    Alpha_i = p_t(x_adv)_{y_i} ** beta (a constant via .item()). Reductions: (1/B) * sum (batchmean);
    T^2 and /T on the first term only.
    """
    KL_loss = nn.KLDivLoss(reduction="none")              # reduce=False
    XENT_loss = nn.CrossEntropyLoss()
    student.train()
    teacher_outputs = teacher(inputs)
    outputs, pert_inputs = _pgd_ce_train_mode(student, inputs, targets, start_noise, epsilon, step_size,
                                              steps)
    Alpha = torch.ones(len(inputs), device=inputs.device)
    basicop = student(pert_inputs).detach()               # noqa: F841 - unused officially too
    guide = teacher(pert_inputs)
    B = len(outputs)
    if epoch >= begin:
        for pp in range(len(outputs)):
            L = F.softmax(guide, dim=1)[pp][targets[pp].item()]
            L = L.pow(beta).item()
            Alpha[pp] = L
        loss = (alpha * temp * temp * (1 / B) * torch.sum(
                    KL_loss(F.log_softmax(outputs / temp, dim=1), F.softmax(teacher_outputs / temp, dim=1)).sum(dim=1))
                + alpha * (1 / B) * torch.sum(
                    KL_loss(F.log_softmax(outputs, dim=1), F.softmax(student(inputs), dim=1)).sum(dim=1).mul(1 - Alpha))
                + (1.0 - alpha) * XENT_loss(student(inputs), targets))
    else:
        loss = (alpha * temp * temp * (1 / B) * torch.sum(
                    KL_loss(F.log_softmax(outputs / temp, dim=1), F.softmax(teacher_outputs / temp, dim=1)).sum(dim=1))
                + (1.0 - alpha) * XENT_loss(student(inputs), targets))
    return loss


# ----------------------------------------------------------------------------------------- RSLAD
def official_rslad_loss(student, teacher, train_batch_data, train_batch_labels, start_noise, steps=10,
                        epsilon=8 / 255, step_size=2 / 255, dataset="cifar10"):
    """RSLAD, zibojia/RSLAD @ c40e04f6c4edcd87431d0250b168d503b1293745: ``rslad_loss.py`` L26-59
    (``rslad_inner_loss``; the script passes step 2/255, eps 8/255, 10 steps), and the training
    step of ``resnet18_rslad_cifar10.py`` L38-40, L49-65 / ``resnet18_rslad_cifar100.py`` L39-40,
    L52-68 (the mobilenet_v2 scripts are identical apart from the student).

    Teacher logits on x under no_grad. Attack in EVAL mode, maximising sum-KL(p_t(x) || p_s(x_adv))
    from x + 0.001 N(0,1) (unclamped). Then train mode: forward on x_adv, then on x.
    ``kl_loss(a, b) = -a*b + log(b + 1e-5)*b`` (note the 1e-5 inside the teacher's log: it changes
    the loss VALUE, not the student's gradient), averaged over batch x classes; 5/6 adv + 1/6 nat.
    CIFAR-100: log(softmax) instead of log_softmax, and both KLs x10. (The official CIFAR-100
    teacher also runs in half precision, ``teacher.half()``; not reproduced here.)
    """
    student.train()
    with torch.no_grad():
        teacher_logits = teacher(train_batch_data)
    # --- rslad_inner_loss(student, teacher_logits, x, y, optimizer, step_size, epsilon, perturb_steps)
    model, x_natural = student, train_batch_data
    criterion_kl = nn.KLDivLoss(reduction="none")         # size_average=False, reduce=False
    model.eval()
    x_adv = x_natural.detach() + start_noise.detach()     # 0.001 * torch.randn(x_natural.shape)
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = criterion_kl(F.log_softmax(model(x_adv), dim=1), F.softmax(teacher_logits, dim=1))
            loss_kl = torch.sum(loss_kl)
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    adv_logits = model(x_adv)
    # --- back in the training script
    student.train()
    nat_logits = student(train_batch_data)

    def kl_loss(a, b):
        return -a * b + torch.log(b + 1e-5) * b

    if dataset == "cifar10":
        kl_Loss1 = kl_loss(F.log_softmax(adv_logits, dim=1), F.softmax(teacher_logits.detach(), dim=1))
        kl_Loss2 = kl_loss(F.log_softmax(nat_logits, dim=1), F.softmax(teacher_logits.detach(), dim=1))
        kl_Loss1 = torch.mean(kl_Loss1)
        kl_Loss2 = torch.mean(kl_Loss2)
        return 5 / 6.0 * kl_Loss1 + 1 / 6.0 * kl_Loss2
    if dataset == "cifar100":
        kl_Loss1 = kl_loss(torch.log(F.softmax(adv_logits, dim=1)), F.softmax(teacher_logits.detach(), dim=1))
        kl_Loss2 = kl_loss(torch.log(F.softmax(nat_logits, dim=1)), F.softmax(teacher_logits.detach(), dim=1))
        kl_Loss1 = 10 * torch.mean(kl_Loss1)
        kl_Loss2 = 10 * torch.mean(kl_Loss2)
        return 5.0 / 6.0 * kl_Loss1 + 1.0 / 6.0 * kl_Loss2
    raise ValueError(dataset)


# ----------------------------------------------------------------------------------------- AdaAD
def official_adaad_loss(student, teacher, inputs, start_noise, steps=10, epsilon=8 / 255, step_size=2 / 255,
                        dataset="cifar10", adaad_alpha=1.0):
    """AdaAD, boyellow/AdaAD @ 9e5c6e5ff73052af196065439517562d37eff6e6: ``AT_helper.py`` L8-48
    (``adaad_inner_loss``, BN_eval=True, random_init=True) and ``main.py`` L326-353 (method
    'AdaAD'; AdaAD_alpha 1.0 from L41; the README's commands pass --epsilon 8 --step_size 2
    --num_steps 10, while the argparse defaults at L49-51 are 16 and 4).

    Attack: student and teacher in eval mode, maximising sum-KL(p_t(x_adv) || p_s(x_adv)) with the
    teacher evaluated at the moving point (its output is not detached: the input gradient flows
    through both networks), from x + 0.001 N(0,1) (unclamped). Loss in train mode: forwards on x
    (always run, though weighted 1 - alpha = 0) then on x_adv; teacher on both under no_grad.
    CIFAR-10: ``nn.KLDivLoss()`` (mean over batch x classes); CIFAR-100: (1/B) * sum (batchmean).
    """
    student.train()                                       # net.train() at the top of train(epoch)
    # --- adaad_inner_loss(net, teacher_net, inputs, step_size, steps, epsilon)
    model, teacher_model, x_natural = student, teacher, inputs
    criterion_kl = nn.KLDivLoss(reduction="none")
    model.eval()                                          # BN_eval
    teacher_model.eval()
    x_adv = x_natural.detach() + start_noise.detach()     # 0.001 * torch.randn(x_natural.shape)
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = criterion_kl(F.log_softmax(model(x_adv), dim=1), F.softmax(teacher_model(x_adv), dim=1))
            loss_kl = torch.sum(loss_kl)
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    adv_inputs = torch.clamp(x_adv, 0.0, 1.0).detach()
    # --- back in main.py train()
    student.train()
    ori_outputs = student(inputs)
    adv_outputs = student(adv_inputs)
    with torch.no_grad():
        teacher.eval()
        t_ori_outputs = teacher(inputs)
        t_adv_outputs = teacher(adv_inputs)
    if dataset == "cifar10":
        kl_loss1 = _kl_mean(F.log_softmax(adv_outputs, dim=1), F.softmax(t_adv_outputs.detach(), dim=1))
        kl_loss2 = _kl_mean(F.log_softmax(ori_outputs, dim=1), F.softmax(t_ori_outputs.detach(), dim=1))
    elif dataset == "cifar100":
        kl_loss1 = (1 / len(adv_outputs)) * torch.sum(nn.KLDivLoss(reduction="none")(
            F.log_softmax(adv_outputs, dim=1), F.softmax(t_adv_outputs.detach(), dim=1)))
        kl_loss2 = (1 / len(adv_outputs)) * torch.sum(nn.KLDivLoss(reduction="none")(
            F.log_softmax(ori_outputs, dim=1), F.softmax(t_ori_outputs.detach(), dim=1)))
    else:
        raise ValueError(dataset)
    return adaad_alpha * kl_loss1 + (1 - adaad_alpha) * kl_loss2
