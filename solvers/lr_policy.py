"""Learning-rate policies, Caffe's formulas (SGDSolver::GetLearningRate). `it` = updates done so far."""
import math

from ..engine.errors import KaffeError
from ..engine.log import logger

POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")


def check_policy(param):
    """Caffe's CHECKs on the policy's fields. Caffe makes them at the first update; kaffe at start-up, so a
    bad solver file fails before the nets are built."""
    policy = param.lr_policy
    if not policy:
        return   # a solver that never updates needs none (pycaffe); learning_rate() refuses the empty name
    if policy not in POLICIES:
        raise KaffeError(_unknown(policy))
    if policy in ("step", "sigmoid") and param.stepsize <= 0:
        raise KaffeError(f"solver: lr_policy '{policy}' needs stepsize > 0, got {param.stepsize}")
    if policy in ("step", "exp", "inv", "multistep", "sigmoid") and param.gamma < 0:
        raise KaffeError(f"solver: lr_policy '{policy}' needs gamma >= 0, got {format(param.gamma, '.6g')}")
    if policy == "poly" and param.max_iter <= 0:
        # Caffe divides by max_iter here without a check; a zero gives an inf/nan rate
        raise KaffeError(f"solver: lr_policy 'poly' needs max_iter > 0, got {param.max_iter}")


def learning_rate(param, it, current_step):
    """Return (rate, current_step); current_step is the multistep position, which the solverstate keeps."""
    policy = param.lr_policy
    base = param.base_lr
    if policy == "fixed":
        return base, current_step
    if policy == "step":
        if param.stepsize <= 0:
            raise KaffeError("lr_policy 'step' needs stepsize > 0")
        current_step = it // param.stepsize
        return base * math.pow(param.gamma, current_step), current_step
    if policy == "exp":
        return base * math.pow(param.gamma, it), current_step
    if policy == "inv":
        return base * math.pow(1.0 + param.gamma * it, -param.power), current_step
    if policy == "multistep":
        if current_step < len(param.stepvalue) and it >= param.stepvalue[current_step]:
            current_step += 1
            logger.info(f"MultiStep Status: Iteration {it}, step = {current_step}")
        return base * math.pow(param.gamma, current_step), current_step
    if policy == "poly":
        return base * math.pow(1.0 - it / param.max_iter, param.power), current_step
    if policy == "sigmoid":
        return base * (1.0 / (1.0 + math.exp(-param.gamma * (it - param.stepsize)))), current_step
    raise KaffeError(_unknown(policy))


def _unknown(policy):
    if not policy:
        return f"solver: lr_policy is not set (known: {', '.join(POLICIES)})"
    return f"Unknown learning rate policy: '{policy}' (known: {', '.join(POLICIES)})"
