"""The routing subject v3: SmolLM2-135M-Instruct made into a Mixture-of-Experts (MoEfication).

Every MLP of the dense model is split into experts by co-activation (:mod:`routelib.subject.moefy`),
given a router fitted with MoEfication's objective (:mod:`routelib.subject.router_fit`); the pilot
(:mod:`routelib.subject.pilot`) measures which shape keeps most of the dense model's quality.
"""
