# Vendored from https://github.com/IST-DASLab/sparsegpt at commit 147d2159dc4f3e9f73e47b32c04d7b3708f44436, file modelutils.py,
# under the Apache-2.0 license (LICENSE beside this file). Unchanged below this header; the reference
# implementation tests/pruning/test_pruning_official.py checks ours against.
import torch
import torch.nn as nn


DEV = torch.device('cuda:0')


def find_layers(module, layers=[nn.Conv2d, nn.Linear], name=''):
    if type(module) in layers:
        return {name: module}
    res = {}
    for name1, child in module.named_children():
        res.update(find_layers(
            child, layers=layers, name=name + '.' + name1 if name != '' else name1
        ))
    return res
