"""Learning-rate policies, Caffe's formulas (SGDSolver::GetLearningRate). `it` = updates done so far."""
import math

from ..engine.errors import KaffeError
from ..engine.log import logger


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
    raise KaffeError(f"Unknown learning rate policy: '{policy}' "
                     f"(known: fixed, step, exp, inv, multistep, poly, sigmoid)")
