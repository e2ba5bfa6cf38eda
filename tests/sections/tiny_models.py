"""Tiny networks and batches for the section tests, in either tab.

Each function takes a tab's library (the `d2lf` fixture, or a library a
test of one tab imports) and builds with that library's framework, which it
imports only then: a test of one tab never loads the other framework.
"""
import functools

from synthetic import tiny_class_images


def is_mxnet(d2lf):
    return d2lf.__name__ == 'd2l_face.mxnet'


def cpus(d2lf, n=1):
    """n CPU devices of the tab's framework (MXNet: n contexts)."""
    if is_mxnet(d2lf):
        from mxnet import npx
        return [npx.cpu(i) for i in range(n)]
    import torch
    return [torch.device('cpu')] * n


@functools.lru_cache(maxsize=None)
def _mxnet_tiny_net_class():
    from mxnet.gluon import nn

    class TinyNet(nn.HybridBlock):
        """A very small embedding network: (N, 3, h, w) -> (N, 8)."""
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.body = nn.HybridSequential()
            self.body.add(nn.Conv2D(4, 3, strides=4), nn.BatchNorm(),
                          nn.Activation('relu'), nn.Dense(8))

        def hybrid_forward(self, F, x):
            return self.body(x - 0.5)
    return TinyNet


@functools.lru_cache(maxsize=None)
def _torch_tiny_net_class():
    from torch import nn

    class TinyNet(nn.Module):
        """A very small embedding network: (N, 3, h, w) -> (N, 8)."""
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4),
                                      nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Flatten(), nn.LazyLinear(8))

        def forward(self, x):
            return self.body(x - 0.5)
    return TinyNet


def tiny_net(d2lf, seed=0, devices=None, size=16):
    """A TinyNet, initialized; PyTorch's with batch statistics of its own."""
    if is_mxnet(d2lf):
        from mxnet import init, npx
        net = _mxnet_tiny_net_class()()
        npx.random.seed(seed)
        net.initialize(init.Xavier(), ctx=devices or cpus(d2lf))
        return net
    import torch
    torch.manual_seed(seed)
    net = _torch_tiny_net_class()()
    net(torch.rand(2, 3, size, size))  # materialize the lazy layer
    # batch statistics that differ from the initial ones
    net.body[1].running_mean.uniform_(-0.2, 0.2)
    net.body[1].running_var.uniform_(0.5, 2.0)
    return net


def tiny_dataset(d2lf, num_classes=4, per_class=16, batch_size=16, seed=0):
    """Batches of 112x112 images whose class sets their color and stripes."""
    X, y = tiny_class_images(num_classes, per_class, seed)
    if is_mxnet(d2lf):
        from mxnet import np
        return [(np.array(X[i:i + batch_size], dtype='float32'),
                 np.array(y[i:i + batch_size], dtype='int64'))
                for i in range(0, len(y), batch_size)]
    import torch
    return [(torch.from_numpy(X[i:i + batch_size]),
             torch.from_numpy(y[i:i + batch_size]).long())
            for i in range(0, len(y), batch_size)]


def tiny_face_net_and_margin(d2lf, num_classes=4, seed=0):
    """A Face-ResNet-18 at 1/16 width, 16-d embeddings, and its margin."""
    if is_mxnet(d2lf):
        from mxnet import init, npx
        npx.random.seed(seed)
        net = d2lf.face_resnet(18, width=0.0625, embedding_size=16)
        net.initialize(init.Xavier())
        margin = d2lf.MarginLogits(num_classes, 16, s=16.0, m2=0.2)
        margin.initialize()
        return net, margin
    import torch
    torch.manual_seed(seed)
    net = d2lf.face_resnet(18, width=0.0625, embedding_size=16)
    margin = d2lf.MarginLogits(num_classes, 16, s=16.0, m2=0.2)
    return net, margin


def small_batches(d2lf, batch_size=4, num_batches=2):
    """Two small batches of tiny_dataset's images: quick steps."""
    X, y = tiny_dataset(d2lf)[0]
    return [(X[i:i + batch_size], y[i:i + batch_size])
            for i in range(0, batch_size * num_batches, batch_size)]
