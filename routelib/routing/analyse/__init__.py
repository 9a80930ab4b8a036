"""Analysing routing: what traces and weights say about a model's routing.

==========================  ==================================================================
:mod:`.predictability`      layer-to-layer predictability (uncertainty coefficient, lookup vs
                            prior accuracy), hop curves, paths, dataset usage tests
:mod:`.locality`            routing across consecutive tokens (the Mixtral paper's §5): top-1
                            repetition and top-k overlap per layer, phase, distance, vs chance
:mod:`.repetition`          repeated n-grams in generated text
:mod:`.weights`             router and expert weights of any supported MoE
:mod:`.geometry`            router similarity, subspaces, co-activation, saturation over training
:mod:`.snapshots`           a model's routers and routing over its training snapshots
:mod:`.expert_paths`        paths over layers vs single experts (normalised MI against a size-matched
                            permutation null, independent-layer control), router control/content split,
                            principal angles between layers' router subspaces
:mod:`.expert_path_verdicts` "paths, not experts" verdicts: single expert vs path vs layers-independent
                            controls with bootstrap intervals, roles by path vs single layer, by path depth
:mod:`.control`             control/content parts of router inputs: probes, angles, clusters
:mod:`.usage`               one set of statistics for every model, from counts: usage entropy, domain
                            and vocabulary specialisation, first-choice transition predictability
==========================  ==================================================================
"""
