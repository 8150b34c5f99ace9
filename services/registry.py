"""Role name -> (servicer class, add-to-server function)."""

from services import policy, reference, reward, value

SERVICES = {
    "policy": (policy.PolicyServicer, policy.add_to_server),
    "reference": (reference.ReferenceServicer, reference.add_to_server),
    "reward": (reward.RewardServicer, reward.add_to_server),
    "value": (value.ValueServicer, value.add_to_server),
}
