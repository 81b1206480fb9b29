"""Writes the prototxt files of kaffe's model zoo (train_val, deploy, solver), our own definitions of the
published architectures, with the layer names and parameter shapes of the public Caffe releases so that
their .caffemodel weights load (`kaffe zoo fetch NAME`).

Run `python -m kaffe.models.generate` after changing a definition; the files it writes are committed.
"""
import os

HERE = os.path.dirname(os.path.abspath(__file__))


class Enum(str):
    """A protobuf enum value (written without quotes)."""


def _value(v):
    if isinstance(v, Enum):
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _message(fields, indent):
    """fields: a list of (name, value) pairs; a value that is a list of pairs is a sub-message."""
    pad = "  " * indent
    out = []
    for name, v in fields:
        if isinstance(v, list):
            out.append(f"{pad}{name} {{")
            out.extend(_message(v, indent + 1))
            out.append(f"{pad}}}")
        else:
            out.append(f"{pad}{name}: {_value(v)}")
    return out


class NetText:
    def __init__(self, name, comment):
        self.lines = [f"# {line}" for line in comment.splitlines()] + [f'name: "{name}"']

    def layer(self, name, type_, bottom=(), top=(), *fields):
        body = [("name", name), ("type", type_)]
        body += [("bottom", b) for b in ([bottom] if isinstance(bottom, str) else bottom)]
        body += [("top", t) for t in ([top] if isinstance(top, str) else top)]
        self.lines += ["layer {"] + _message(body + [f for f in fields if f], 1) + ["}"]

    def write(self, path):
        with open(path, "w") as f:
            f.write("\n".join(self.lines) + "\n")


def filler(type_, **kw):
    return [("type", type_)] + [(k, v) for k, v in kw.items()]


LEARN = [("param", [("lr_mult", 1), ("decay_mult", 1)]), ("param", [("lr_mult", 2), ("decay_mult", 0)])]
LEARN_NO_BIAS = [("param", [("lr_mult", 1), ("decay_mult", 1)])]


class Builder:
    """Adds layers to a NetText; `train` adds parameter specs and fillers (train_val), deploy omits them."""

    def __init__(self, net, train):
        self.net, self.train = net, train

    def conv(self, name, bottom, num_output, kernel, stride=1, pad=0, group=1, bias=True, top=None,
             weight=None, bias_value=0.0):
        p = [("num_output", num_output)]
        if pad:
            p.append(("pad", pad))
        p.append(("kernel_size", kernel))
        if stride != 1:
            p.append(("stride", stride))
        if group != 1:
            p.append(("group", group))
        if not bias:
            p.append(("bias_term", False))
        if self.train:
            p.append(("weight_filler", weight or filler("msra")))
            if bias:
                p.append(("bias_filler", filler("constant", value=bias_value)))
        specs = (LEARN if bias else LEARN_NO_BIAS) if self.train else []
        self.net.layer(name, "Convolution", bottom, top or name, *specs, ("convolution_param", p))
        return top or name

    def fc(self, name, bottom, num_output, weight=None, bias_value=0.0, top=None):
        p = [("num_output", num_output)]
        if self.train:
            p += [("weight_filler", weight or filler("gaussian", std=0.005)),
                  ("bias_filler", filler("constant", value=bias_value))]
        self.net.layer(name, "InnerProduct", bottom, top or name, *(LEARN if self.train else []),
                       ("inner_product_param", p))
        return top or name

    def relu(self, name, blob):
        self.net.layer(name, "ReLU", blob, blob)
        return blob

    def pool(self, name, bottom, method, kernel=None, stride=1, pad=0, global_pooling=False, top=None):
        p = [("pool", Enum(method))]
        if global_pooling:
            p.append(("global_pooling", True))
        else:
            p.append(("kernel_size", kernel))
            if stride != 1:
                p.append(("stride", stride))
            if pad:
                p.append(("pad", pad))
        self.net.layer(name, "Pooling", bottom, top or name, ("pooling_param", p))
        return top or name

    def lrn(self, name, bottom, local_size=5, alpha=1e-4, beta=0.75, region=None, top=None):
        p = [("local_size", local_size), ("alpha", alpha), ("beta", beta)]
        if region:
            p.append(("norm_region", Enum(region)))
        self.net.layer(name, "LRN", bottom, top or name, ("lrn_param", p))
        return top or name

    def dropout(self, name, blob, ratio):
        self.net.layer(name, "Dropout", blob, blob, ("dropout_param", [("dropout_ratio", ratio)]))
        return blob

    def concat(self, name, bottoms):
        self.net.layer(name, "Concat", bottoms, name)
        return name

    def bn_scale(self, bn_name, scale_name, blob):
        """Caffe's BatchNorm (statistics only) + Scale (learned gamma and beta), both in place."""
        if self.train:
            self.net.layer(bn_name, "BatchNorm", blob, blob)
        else:
            self.net.layer(bn_name, "BatchNorm", blob, blob, ("batch_norm_param", [("use_global_stats", True)]))
        self.net.layer(scale_name, "Scale", blob, blob, ("scale_param", [("bias_term", True)]))
        return blob


def data_layers(net, source, mean, crop, train_batch, test_batch, scale=None, mirror=True):
    """Data layers for the TRAIN and TEST phases; `mean` is a mean file path or a list of per-channel values."""
    for phase, batch, split in (("TRAIN", train_batch, "train"), ("TEST", test_batch, "val")):
        transform = []
        if phase == "TRAIN" and mirror:
            transform.append(("mirror", True))
        if crop:
            transform.append(("crop_size", crop))
        if isinstance(mean, str):
            transform.append(("mean_file", mean))
        else:
            transform += [("mean_value", m) for m in mean]
        if scale:
            transform.append(("scale", scale))
        net.layer("data", "Data", (), ("data", "label"), ("include", [("phase", Enum(phase))]),
                  ("transform_param", transform),
                  ("data_param", [("source", source.format(split=split)), ("batch_size", batch),
                                  ("backend", Enum("LMDB"))]))


def loss_layers(net, bottom, top5=True, prefix="", loss_weight=None):
    weight = [("loss_weight", loss_weight)] if loss_weight is not None else []
    net.layer(f"{prefix}loss", "SoftmaxWithLoss", (bottom, "label"), f"{prefix}loss", *weight)
    net.layer(f"{prefix}accuracy" if not top5 else f"{prefix}accuracy/top-1", "Accuracy", (bottom, "label"),
              f"{prefix}accuracy" if not top5 else f"{prefix}accuracy/top-1", ("include", [("phase", Enum("TEST"))]))
    if top5:
        net.layer(f"{prefix}accuracy/top-5", "Accuracy", (bottom, "label"), f"{prefix}accuracy/top-5",
                  ("include", [("phase", Enum("TEST"))]), ("accuracy_param", [("top_k", 5)]))


def input_layer(net, shape):
    net.layer("data", "Input", (), "data", ("input_param", [("shape", [("dim", d) for d in shape])]))


def write_solver(path, net_file, prefix, comment, **fields):
    lines = [f"# {line}" for line in comment.splitlines()] + [f'net: "{net_file}"']
    for key, value in fields.items():
        for v in value if isinstance(value, tuple) else (value,):
            lines.append(f"{key}: {_value(v)}")
    lines.append(f'snapshot_prefix: "{prefix}"')
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def both(name, comment, body, deploy_shape, train_data, classifier):
    """Write <name>/train_val.prototxt and <name>/deploy.prototxt from one `body(builder, input_blob)`."""
    folder = os.path.join(HERE, name)
    os.makedirs(folder, exist_ok=True)
    train = NetText(name, comment + "\nTraining and validation net.")
    train_data(train)
    logits = body(Builder(train, True), "data")
    loss_layers(train, logits, **classifier)
    train.write(os.path.join(folder, "train_val.prototxt"))
    deploy = NetText(name, comment + "\nDeployment net: Input blob `data`, output `prob`.")
    input_layer(deploy, deploy_shape)
    logits = body(Builder(deploy, False), "data")
    deploy.layer("prob", "Softmax", logits, "prob")
    deploy.write(os.path.join(folder, "deploy.prototxt"))
    return folder


IMAGENET = "data/ilsvrc12/ilsvrc12_{split}_lmdb"
IMAGENET_MEAN_FILE = "data/ilsvrc12/imagenet_mean.binaryproto"
BGR_MEAN = [104.0, 117.0, 123.0]


# -- CIFAR-10 ------------------------------------------------------------------------------------
def cifar10_quick(b, x):
    x = b.conv("conv1", x, 32, 5, pad=2, weight=filler("gaussian", std=0.0001))
    x = b.pool("pool1", x, "MAX", 3, 2)
    b.relu("relu1", x)
    x = b.conv("conv2", x, 32, 5, pad=2, weight=filler("gaussian", std=0.01))
    b.relu("relu2", x)
    x = b.pool("pool2", x, "AVE", 3, 2)
    x = b.conv("conv3", x, 64, 5, pad=2, weight=filler("gaussian", std=0.01))
    b.relu("relu3", x)
    x = b.pool("pool3", x, "AVE", 3, 2)
    x = b.fc("ip1", x, 64, weight=filler("gaussian", std=0.1))
    return b.fc("ip2", x, 10, weight=filler("gaussian", std=0.1))


def cifar10_full(b, x):
    x = b.conv("conv1", x, 32, 5, pad=2, weight=filler("gaussian", std=0.0001))
    x = b.pool("pool1", x, "MAX", 3, 2)
    b.relu("relu1", x)
    x = b.lrn("norm1", x, 3, 5e-05, 0.75, "WITHIN_CHANNEL")
    x = b.conv("conv2", x, 32, 5, pad=2, weight=filler("gaussian", std=0.01))
    b.relu("relu2", x)
    x = b.pool("pool2", x, "AVE", 3, 2)
    x = b.lrn("norm2", x, 3, 5e-05, 0.75, "WITHIN_CHANNEL")
    x = b.conv("conv3", x, 64, 5, pad=2, weight=filler("gaussian", std=0.01))
    b.relu("relu3", x)
    x = b.pool("pool3", x, "AVE", 3, 2)
    if b.train:  # Caffe's example decays the classifier 250x more than the convolutions
        b.net.layer("ip1", "InnerProduct", x, "ip1", ("param", [("lr_mult", 1), ("decay_mult", 250)]),
                    ("param", [("lr_mult", 2), ("decay_mult", 0)]),
                    ("inner_product_param", [("num_output", 10), ("weight_filler", filler("gaussian", std=0.01)),
                                             ("bias_filler", filler("constant"))]))
        return "ip1"
    return b.fc("ip1", x, 10)


def cifar_data(train_batch, test_batch):
    return lambda net: data_layers(net, "data/cifar10/cifar10_{split}_lmdb", "data/cifar10/mean.binaryproto",
                                   None, train_batch, test_batch, mirror=False)


# -- ImageNet, 2012: CaffeNet and AlexNet ------------------------------------------------------------
def _alexnet_family(pool_before_norm, bias_one):
    def body(b, x):
        g = filler("gaussian", std=0.01)
        x = b.conv("conv1", x, 96, 11, stride=4, weight=g)
        b.relu("relu1", x)
        if pool_before_norm:
            x = b.lrn("norm1", b.pool("pool1", x, "MAX", 3, 2))
        else:
            x = b.pool("pool1", b.lrn("norm1", x), "MAX", 3, 2)
        x = b.conv("conv2", x, 256, 5, pad=2, group=2, weight=g, bias_value=bias_one)
        b.relu("relu2", x)
        if pool_before_norm:
            x = b.lrn("norm2", b.pool("pool2", x, "MAX", 3, 2))
        else:
            x = b.pool("pool2", b.lrn("norm2", x), "MAX", 3, 2)
        x = b.conv("conv3", x, 384, 3, pad=1, weight=g)
        b.relu("relu3", x)
        x = b.conv("conv4", x, 384, 3, pad=1, group=2, weight=g, bias_value=bias_one)
        b.relu("relu4", x)
        x = b.conv("conv5", x, 256, 3, pad=1, group=2, weight=g, bias_value=bias_one)
        b.relu("relu5", x)
        x = b.pool("pool5", x, "MAX", 3, 2)
        x = b.fc("fc6", x, 4096, bias_value=bias_one)
        b.dropout("drop6", b.relu("relu6", x), 0.5)
        x = b.fc("fc7", x, 4096, bias_value=bias_one)
        b.dropout("drop7", b.relu("relu7", x), 0.5)
        return b.fc("fc8", x, 1000, weight=filler("gaussian", std=0.01))
    return body


def imagenet_data(crop, train_batch, test_batch, mean=IMAGENET_MEAN_FILE, scale=None):
    return lambda net: data_layers(net, IMAGENET, mean, crop, train_batch, test_batch, scale=scale)


# -- GoogLeNet -----------------------------------------------------------------------------------
INCEPTION = {  # 1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool projection
    "3a": (64, 96, 128, 16, 32, 32), "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64), "4b": (160, 112, 224, 24, 64, 64), "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64), "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128), "5b": (384, 192, 384, 48, 128, 128),
}


def _inception(b, name, x, sizes):
    n1, r3, n3, r5, n5, proj = sizes
    p = f"inception_{name}/"
    xavier = filler("xavier")
    c = b.conv(p + "1x1", x, n1, 1, weight=xavier, bias_value=0.2)
    b.relu(p + "relu_1x1", c)
    r = b.conv(p + "3x3_reduce", x, r3, 1, weight=xavier, bias_value=0.2)
    b.relu(p + "relu_3x3_reduce", r)
    t = b.conv(p + "3x3", r, n3, 3, pad=1, weight=xavier, bias_value=0.2)
    b.relu(p + "relu_3x3", t)
    r = b.conv(p + "5x5_reduce", x, r5, 1, weight=xavier, bias_value=0.2)
    b.relu(p + "relu_5x5_reduce", r)
    f = b.conv(p + "5x5", r, n5, 5, pad=2, weight=xavier, bias_value=0.2)
    b.relu(p + "relu_5x5", f)
    q = b.pool(p + "pool", x, "MAX", 3, 1, pad=1)
    q = b.conv(p + "pool_proj", q, proj, 1, weight=xavier, bias_value=0.2)
    b.relu(p + "relu_pool_proj", q)
    return b.concat(p + "output", [c, t, f, q])


def _aux_classifier(b, name, x):
    x = b.pool(f"{name}/ave_pool", x, "AVE", 5, 3)
    x = b.conv(f"{name}/conv", x, 128, 1, weight=filler("xavier"), bias_value=0.2)
    b.relu(f"{name}/relu_conv", x)
    x = b.fc(f"{name}/fc", x, 1024, weight=filler("xavier"), bias_value=0.2)
    b.dropout(f"{name}/drop_fc", b.relu(f"{name}/relu_fc", x), 0.7)
    x = b.fc(f"{name}/classifier", x, 1000, weight=filler("xavier"))
    loss_layers(b.net, x, prefix=f"{name}/", loss_weight=0.3)


def googlenet(b, x):
    xavier = filler("xavier")
    x = b.conv("conv1/7x7_s2", x, 64, 7, stride=2, pad=3, weight=xavier, bias_value=0.2)
    b.relu("conv1/relu_7x7", x)
    x = b.lrn("pool1/norm1", b.pool("pool1/3x3_s2", x, "MAX", 3, 2))
    x = b.conv("conv2/3x3_reduce", x, 64, 1, weight=xavier, bias_value=0.2)
    b.relu("conv2/relu_3x3_reduce", x)
    x = b.conv("conv2/3x3", x, 192, 3, pad=1, weight=xavier, bias_value=0.2)
    b.relu("conv2/relu_3x3", x)
    x = b.pool("pool2/3x3_s2", b.lrn("conv2/norm2", x), "MAX", 3, 2)
    for name in ("3a", "3b", "4a", "4b", "4c", "4d", "4e", "5a", "5b"):
        if name in ("4a", "5a"):
            x = b.pool(f"pool{name[0]}/3x3_s2", x, "MAX", 3, 2)
        x = _inception(b, name, x, INCEPTION[name])
        if b.train and name in ("4a", "4d"):
            _aux_classifier(b, "loss1" if name == "4a" else "loss2", x)
    x = b.pool("pool5/7x7_s1", x, "AVE", 7, 1)
    b.dropout("pool5/drop_7x7_s1", x, 0.4)
    return b.fc("loss3/classifier", x, 1000, weight=xavier)


# -- VGG-16 --------------------------------------------------------------------------------------
def vgg16(b, x):
    for stage, (width, depth) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)), start=1):
        for i in range(1, depth + 1):
            x = b.conv(f"conv{stage}_{i}", x, width, 3, pad=1)
            b.relu(f"relu{stage}_{i}", x)
        x = b.pool(f"pool{stage}", x, "MAX", 2, 2)
    x = b.fc("fc6", x, 4096)
    b.dropout("drop6", b.relu("relu6", x), 0.5)
    x = b.fc("fc7", x, 4096)
    b.dropout("drop7", b.relu("relu7", x), 0.5)
    return b.fc("fc8", x, 1000)


# -- ResNet-50 (He et al.'s Caffe release: BatchNorm + Scale after each convolution, no conv bias) -----------
def _resnet_conv(b, conv_name, suffix, x, num_output, kernel, stride=1, pad=0, relu=True, top=None):
    y = b.conv(conv_name, x, num_output, kernel, stride=stride, pad=pad, bias=False, top=top)
    b.bn_scale(f"bn{suffix}", f"scale{suffix}", y)
    if relu:
        b.relu(f"{conv_name}_relu", y)
    return y


def _bottleneck(b, stage, block, x, width, stride, project):
    name = f"{stage}{block}"
    if project:
        shortcut = _resnet_conv(b, f"res{name}_branch1", f"{name}_branch1", x, 4 * width, 1, stride, relu=False)
    else:
        shortcut = x
    y = _resnet_conv(b, f"res{name}_branch2a", f"{name}_branch2a", x, width, 1, stride)
    y = _resnet_conv(b, f"res{name}_branch2b", f"{name}_branch2b", y, width, 3, pad=1)
    y = _resnet_conv(b, f"res{name}_branch2c", f"{name}_branch2c", y, 4 * width, 1, relu=False)
    b.net.layer(f"res{name}", "Eltwise", (shortcut, y), f"res{name}")
    b.relu(f"res{name}_relu", f"res{name}")
    return f"res{name}"


def resnet50(b, x):
    x = b.conv("conv1", x, 64, 7, stride=2, pad=3)
    b.bn_scale("bn_conv1", "scale_conv1", x)
    b.relu("conv1_relu", x)
    x = b.pool("pool1", x, "MAX", 3, 2)
    for stage, width, blocks in ((2, 64, 3), (3, 128, 4), (4, 256, 6), (5, 512, 3)):
        for i in range(blocks):
            stride = 2 if i == 0 and stage > 2 else 1
            x = _bottleneck(b, stage, "abcdef"[i], x, width, stride, project=(i == 0))
    x = b.pool("pool5", x, "AVE", 7, 1)
    return b.fc("fc1000", x, 1000, weight=filler("msra"))


# -- SqueezeNet 1.1 ------------------------------------------------------------------------------
def _fire(b, n, x, squeeze, expand):
    p = f"fire{n}/"
    s = b.conv(p + "squeeze1x1", x, squeeze, 1, weight=filler("xavier"))
    b.relu(p + "relu_squeeze1x1", s)
    e1 = b.conv(p + "expand1x1", s, expand, 1, weight=filler("xavier"))
    b.relu(p + "relu_expand1x1", e1)
    e3 = b.conv(p + "expand3x3", s, expand, 3, pad=1, weight=filler("xavier"))
    b.relu(p + "relu_expand3x3", e3)
    return b.concat(p + "concat", [e1, e3])


def squeezenet1_1(b, x):
    x = b.conv("conv1", x, 64, 3, stride=2, weight=filler("xavier"))
    b.relu("relu_conv1", x)
    x = b.pool("pool1", x, "MAX", 3, 2)
    x = _fire(b, 2, x, 16, 64)
    x = _fire(b, 3, x, 16, 64)
    x = b.pool("pool3", x, "MAX", 3, 2)
    x = _fire(b, 4, x, 32, 128)
    x = _fire(b, 5, x, 32, 128)
    x = b.pool("pool5", x, "MAX", 3, 2)
    for n, (s, e) in zip(range(6, 10), ((48, 192), (48, 192), (64, 256), (64, 256))):
        x = _fire(b, n, x, s, e)
    b.dropout("drop9", x, 0.5)
    x = b.conv("conv10", x, 1000, 1, weight=filler("gaussian", mean=0.0, std=0.01))
    b.relu("relu_conv10", x)
    return b.pool("pool10", x, "AVE", global_pooling=True)


# -- MobileNet v1 (shicai/MobileNet-Caffe names: depthwise = grouped Convolution) ------------------------
MOBILENET = [  # (name, output channels, stride) of each depthwise-separable block
    ("2_1", 64, 1), ("2_2", 128, 2), ("3_1", 128, 1), ("3_2", 256, 2), ("4_1", 256, 1), ("4_2", 512, 2),
    ("5_1", 512, 1), ("5_2", 512, 1), ("5_3", 512, 1), ("5_4", 512, 1), ("5_5", 512, 1), ("5_6", 1024, 2),
    ("6", 1024, 1),
]


def mobilenet_v1(b, x):
    x = b.conv("conv1", x, 32, 3, stride=2, pad=1, bias=False)
    b.bn_scale("conv1/bn", "conv1/scale", x)
    b.relu("relu1", x)
    channels = 32
    for name, out, stride in MOBILENET:
        x = b.conv(f"conv{name}/dw", x, channels, 3, stride=stride, pad=1, group=channels, bias=False)
        b.bn_scale(f"conv{name}/dw/bn", f"conv{name}/dw/scale", x)
        b.relu(f"relu{name}/dw", x)
        x = b.conv(f"conv{name}/sep", x, out, 1, bias=False)
        b.bn_scale(f"conv{name}/sep/bn", f"conv{name}/sep/scale", x)
        b.relu(f"relu{name}/sep", x)
        channels = out
    x = b.pool("pool6", x, "AVE", global_pooling=True)
    return b.conv("fc7", x, 1000, 1)


def main():
    cifar = "CIFAR-10 {} (Caffe's examples/cifar10 recipe), written for kaffe."
    folder = both("cifar10_quick", cifar.format("quick"), cifar10_quick, (1, 3, 32, 32), cifar_data(100, 100),
                  {"top5": False})
    write_solver(os.path.join(folder, "solver.prototxt"), "models/cifar10_quick/train_val.prototxt",
                 "models/cifar10_quick/cifar10_quick", "4000 iterations at lr 0.001; Caffe's recipe then runs 1000 "
                 "more at 0.0001\n(restart with --snapshot and base_lr: 0.0001, max_iter: 5000).",
                 test_iter=100, test_interval=500, base_lr=0.001, momentum=0.9, weight_decay=0.004,
                 lr_policy="fixed", display=100, max_iter=4000, snapshot=4000, solver_mode=Enum("CPU"))
    folder = both("cifar10_full", cifar.format("full"), cifar10_full, (1, 3, 32, 32), cifar_data(100, 100),
                  {"top5": False})
    write_solver(os.path.join(folder, "solver.prototxt"), "models/cifar10_full/train_val.prototxt",
                 "models/cifar10_full/cifar10_full", "60000 iterations at 0.001, then Caffe's recipe lowers the "
                 "rate to 0.0001 (65000) and 0.00001 (70000).",
                 test_iter=100, test_interval=1000, base_lr=0.001, momentum=0.9, weight_decay=0.004,
                 lr_policy="multistep", gamma=0.1, stepvalue=(60000, 65000), display=200, max_iter=70000,
                 snapshot=10000, solver_mode=Enum("CPU"))
    imagenet_solver = dict(test_iter=1000, test_interval=1000, base_lr=0.01, lr_policy="step", gamma=0.1,
                           stepsize=100000, display=20, max_iter=450000, momentum=0.9, weight_decay=0.0005,
                           snapshot=10000)
    for name, title, pool_first, bias in (("caffenet", "CaffeNet (BVLC reference: pool before norm)", True, 1.0),
                                          ("alexnet", "AlexNet (Krizhevsky et al. 2012, BVLC replication)", False,
                                           0.1)):
        folder = both(name, title, _alexnet_family(pool_first, bias), (10, 3, 227, 227),
                      imagenet_data(227, 256, 50), {"top5": True})
        write_solver(os.path.join(folder, "solver.prototxt"), f"models/{name}/train_val.prototxt",
                     f"models/{name}/{name}_train", "BVLC's ImageNet recipe.", **imagenet_solver)
    folder = both("googlenet", "GoogLeNet (Szegedy et al. 2014, BVLC replication)", googlenet, (10, 3, 224, 224),
                  imagenet_data(224, 32, 50, mean=BGR_MEAN), {"top5": True, "prefix": "loss3/"})
    write_solver(os.path.join(folder, "solver.prototxt"), "models/googlenet/train_val.prototxt",
                 "models/googlenet/googlenet_quick", "BVLC's quick GoogLeNet recipe (60 epochs, poly decay).",
                 test_iter=1000, test_interval=4000, test_initialization=False, display=40, average_loss=40,
                 base_lr=0.01, lr_policy="poly", power=0.5, max_iter=2400000, momentum=0.9, weight_decay=0.0002,
                 snapshot=40000)
    folder = both("vgg16", "VGG-16 (Simonyan & Zisserman 2014, configuration D)", vgg16, (10, 3, 224, 224),
                  imagenet_data(224, 32, 50, mean=[103.939, 116.779, 123.68]), {"top5": True})
    write_solver(os.path.join(folder, "solver.prototxt"), "models/vgg16/train_val.prototxt", "models/vgg16/vgg16",
                 "The paper's schedule: batch 256 (32 x iter_size 8), lr 0.01 divided by 10 on plateaus.",
                 test_iter=1000, test_interval=5000, base_lr=0.01, lr_policy="step", gamma=0.1, stepsize=100000,
                 display=20, max_iter=370000, momentum=0.9, weight_decay=0.0005, iter_size=8, snapshot=10000)
    folder = both("resnet50", "ResNet-50 (He et al. 2015): BatchNorm + Scale + Eltwise", resnet50, (1, 3, 224, 224),
                  imagenet_data(224, 32, 50, mean=BGR_MEAN), {"top5": True})
    write_solver(os.path.join(folder, "solver.prototxt"), "models/resnet50/train_val.prototxt",
                 "models/resnet50/resnet50", "The paper's schedule: batch 256 (32 x iter_size 8), lr 0.1 divided by "
                 "10 at 150k and 300k iterations.", test_iter=1000, test_interval=5000, base_lr=0.1,
                 lr_policy="multistep", gamma=0.1, stepvalue=(150000, 300000), display=20, max_iter=600000,
                 momentum=0.9, weight_decay=0.0001, iter_size=8, snapshot=10000)
    folder = both("squeezenet1_1", "SqueezeNet 1.1 (Iandola et al. 2016)", squeezenet1_1, (10, 3, 227, 227),
                  imagenet_data(227, 32, 25, mean=BGR_MEAN), {"top5": True})
    write_solver(os.path.join(folder, "solver.prototxt"), "models/squeezenet1_1/train_val.prototxt",
                 "models/squeezenet1_1/squeezenet", "The SqueezeNet release's recipe: batch 512 (32 x iter_size "
                 "16), linear (poly 1) decay.", test_iter=2000, test_interval=1000, base_lr=0.04,
                 display=40, max_iter=170000, iter_size=16, lr_policy="poly", power=1.0, momentum=0.9,
                 weight_decay=0.0002, snapshot=1000, random_seed=42)
    folder = both("mobilenet_v1", "MobileNet v1 1.0-224 (Howard et al. 2017): depthwise = grouped Convolution",
                  mobilenet_v1, (1, 3, 224, 224),
                  imagenet_data(224, 32, 50, mean=[103.94, 116.78, 123.68], scale=0.017), {"top5": True})
    write_solver(os.path.join(folder, "solver.prototxt"), "models/mobilenet_v1/train_val.prototxt",
                 "models/mobilenet_v1/mobilenet_v1", "Ours (the Caffe release ships no solver): batch 256 "
                 "(32 x iter_size 8), poly decay.", test_iter=1000, test_interval=5000, base_lr=0.1,
                 lr_policy="poly", power=1.0, display=20, max_iter=600000, momentum=0.9, weight_decay=4e-05,
                 iter_size=8, snapshot=10000)


if __name__ == "__main__":
    main()
