"""Train a face recognition model: the chapter's library as a program.

What ``arcface_torch``'s ``train_v2.py`` is for InsightFace, this is for the
chapter: the network, margin, loader, schedule and evaluation of
``d2l_face.torch``, put together to train on a real machine::

    python -m d2l_face.train --preset cpu --data DIR --out DIR
    torchrun --standalone --nproc_per_node=8 -m d2l_face.train \\
        --preset gpu --data DIR --out DIR

The ideas, each in a function or two below:

* A configuration starts from a preset (the chapter's ``CPU_CONFIG`` or
  ``GPU_CONFIG``), then a JSON file, then flags; every value is checked
  before the process group, the data or the model are touched
  (``train_config.py``).
* Under ``torchrun`` each process is a rank: the backbone is data parallel
  (DDP), the class weight is sharded over the ranks and the softmax is
  computed with the chapter's ``dist_sharded_softmax_loss``. Each rank may
  sample a fraction of its shard's classes per step (partial FC), always
  keeping the classes of the batch. Started without ``torchrun`` the
  program is a group of one rank, running the very same code.
* A step's global batch is a pure function of (seed, step) and is cut into
  ``world_size * micro_batches`` equal parts, rank r taking parts
  ``r * micro_batches, ...``. So one process with ``micro_batches=2``
  computes the same gradients as two ranks with one each (batch norm sees
  the same parts), and a run resumed at step k trains on the batches the
  uninterrupted run would have.
* Every ``checkpoint_every`` steps each rank writes its state (model, its
  class shard, optimizer, schedule, GradScaler, sampler, RNGs) whole or
  not at all; rank 0 then records the files' digests in ``latest.json``.
  A run started again loads the newest checkpoint whose files all match,
  so ``torchrun --max-restarts`` replaces a dead rank and goes on.
"""
import contextlib
import copy
import datetime
import hashlib
import io
import json
import math
import os
import sys
import time

import numpy as onp
import torch
import tqdm
from torch import distributed as dist
from torch import nn
from torch.distributed import nn as dist_nn

from d2l_face import orphans, publish
from d2l_face import torch as d2lf
from d2l_face.train_config import ConfigError, parse_config

# KEPT: how many checkpoints stay listed (at least 2: one to fall back on).
CHECKPOINTS, MANIFEST, KEPT = 'checkpoints', 'latest.json', 2
# A rank's checkpoint is read whole into memory: this much at most.
CHECKPOINT_MAX_BYTES = 16 << 30
# Test hook: "step:K", "checkpoint:K" or "rank1@step:K" stops the rank there,
# once: it writes its pid to $D2L_FACE_TRAIN_STALL_DIR/stalled-rank<r> and
# sleeps, so that a test can kill it at a known point.
STALL_VAR = 'D2L_FACE_TRAIN_STALL'


def die_with_parent():
    """Ask Linux to kill this rank when its launcher dies (even by SIGKILL).

    torchrun starts each rank in a session of its own and stops them when
    it exits normally; killed, it stops nothing, and a rank waiting in a
    collective operation would wait for `dist_timeout` seconds."""
    if 'TORCHELASTIC_RUN_ID' in os.environ:  # started by torchrun
        orphans.die_with_parent(os.getppid())


def start_group(cfg):
    """Join the process group: (rank, world_size, device)."""
    timeout = datetime.timedelta(seconds=cfg['dist_timeout'])
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    device = torch.device('cuda', local_rank) if cuda else torch.device('cpu')
    if cuda:
        torch.cuda.set_device(device)
    if 'RANK' in os.environ:  # started by torchrun
        dist.init_process_group('nccl' if cuda else 'gloo', timeout=timeout)
    else:  # a group of one: the same code runs without torchrun
        dist.init_process_group('gloo', store=dist.HashStore(), rank=0,
                                world_size=1, timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), device


class GlobalBatches:
    """Which images (and flips) each part of each step's global batch holds.

    The order is a pure function of (seed, epoch), so a resumed run and
    every rank agree on it without being told."""
    def __init__(self, num_images, part_size, num_parts, seed):
        self.part_size, self.num_parts, self.seed = part_size, num_parts, seed
        self.steps_per_epoch = num_images // (part_size * num_parts)
        self.num_images = num_images
        if self.steps_per_epoch == 0:
            raise ConfigError(f'{num_images} images, fewer than one global '
                              f'batch of {part_size * num_parts}')
        self.epoch, self._order = None, None

    def state_dict(self, step):
        """Where step `step` (counted from 0) lies: (epoch, position)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        return {'epoch': epoch, 'position': position}

    def part(self, step, index):
        """(image indices, flips) of part `index` of step `step`."""
        state = self.state_dict(step)
        if state['epoch'] != self.epoch:
            rng = onp.random.default_rng([self.seed, state['epoch']])
            self.epoch = state['epoch']
            self._order = (rng.permutation(self.num_images),
                           rng.random(self.num_images) < 0.5)
        batch = self.part_size * self.num_parts
        first = state['position'] * batch + index * self.part_size
        return tuple(a[first:first + self.part_size] for a in self._order)


class PartReader(d2lf.FaceRecordIter):
    """The pack's images in the order of `GlobalBatches`, decoded ahead."""
    def parts(self, batches, steps, indices):
        """Yield (X, y) of the parts `indices` of each step, in order."""
        todo = [(step, i) for step in steps for i in indices]
        pending = []
        for k in range(len(todo)):
            while len(pending) < 2 and k + len(pending) < len(todo):
                pending.append(self._submit(
                    *batches.part(*todo[k + len(pending)])))
            yield self._finish(*pending.pop(0))


def load_parts(cfg, rank):
    """Rank 0 packs a folder dataset; then every rank opens the pack."""
    if rank == 0:
        with contextlib.redirect_stdout(sys.stderr):
            d2lf.load_data_facerec(cfg['data'], (), cfg['batch_per_device'])
    dist.barrier()
    train_iter, _ = d2lf.load_data_facerec(cfg['data'], (),
                                           cfg['batch_per_device'])
    return PartReader(train_iter.prefix, cfg['batch_per_device'],
                      train_iter.image_size, train_iter.num_classes,
                      num_threads=cfg['loader_threads'] or None)


class ClassShard(nn.Module):
    """This rank's rows of the class weight: classes start, ..., stop - 1."""
    def __init__(self, num_classes, embedding_size, rank, world_size, seed):
        super().__init__()
        self.start, self.stop = d2lf.split_classes(num_classes,
                                                   world_size)[rank]
        # Drawn whole and sliced: the same weight for any number of ranks.
        generator = torch.Generator().manual_seed(seed)
        weight = torch.normal(0, 0.01, (num_classes, embedding_size),
                              generator=generator)
        self.weight = nn.Parameter(weight[self.start:self.stop].clone())


def sample_classes(labels, num_classes, rate, generator):
    """Partial FC: (rows to use or None for all, labels among those rows).

    As arcface_torch does: a random `rate` of the shard's classes, the
    classes of the batch (`labels` in 0, ..., num_classes - 1) always
    among them; a label outside the shard becomes -1."""
    owned = (labels >= 0) & (labels < num_classes)
    if rate >= 1:
        return None, torch.where(owned, labels, -1)
    device, labels, owned = labels.device, labels.cpu(), owned.cpu()
    score = torch.rand(num_classes, generator=generator)  # on the CPU
    score[labels[owned]] = 2.0  # the positives first
    k = max(math.ceil(rate * num_classes), int((score > 1).sum()))
    rows = torch.topk(score, k).indices.sort().values
    position = torch.full((num_classes,), -1, dtype=torch.long)
    position[rows] = torch.arange(k)
    labels = torch.where(owned, position[torch.where(owned, labels, 0)], -1)
    return rows.to(device), labels.to(device)


def margin_logits(weight, embeddings, labels, s, m1, m2, m3, eps=1e-7):
    """MarginLogits of the classes of `weight`'s rows; label -1: no margin."""
    def unit_rows(x):
        return x / torch.sqrt((x * x).sum(dim=1, keepdim=True) + 1e-12)
    cos = unit_rows(embeddings) @ unit_rows(weight).T
    cos = torch.clamp(cos, -1 + eps, 1 - eps)
    owned = labels >= 0
    local = torch.where(owned, labels, 0)
    cos_target = cos.gather(1, local[:, None])[:, 0]
    target = d2lf.margin_target_logit(torch.arccos(cos_target), s, m1, m2, m3)
    one_hot = nn.functional.one_hot(local, len(weight)).to(cos.dtype)
    one_hot = one_hot * owned[:, None]
    return s * cos + one_hot * (target - s * cos_target)[:, None]


def gather(x, world_size):
    """All ranks' x, concatenated (differentiable)."""
    return x if world_size == 1 else torch.cat(dist_nn.all_gather(x))


def all_reduce(tensor, op=dist.ReduceOp.SUM):
    """All-reduce a small CPU tensor (NCCL reduces only GPU tensors)."""
    on_gpu = dist.get_backend() == 'nccl'
    result = tensor.cuda() if on_gpu else tensor.clone()
    dist.all_reduce(result, op=op)
    return result.cpu()


def part_loss(shard, embeddings, y, cfg, world_size, generator):
    """Summed margin loss of this rank's part over the global part."""
    rank = dist.get_rank()
    X = gather(embeddings, world_size)
    ys = gather(y, world_size)
    rows, labels = sample_classes(ys - shard.start, shard.stop - shard.start,
                                  cfg['sample_rate'], generator)
    weight = shard.weight if rows is None else shard.weight[rows]
    logits = margin_logits(weight, X, labels, cfg['s'],
                           *d2lf.MARGIN_SETTINGS[cfg['margin']])
    loss = d2lf.dist_sharded_softmax_loss(logits, labels, 0)
    n = len(y)
    return loss[rank * n:(rank + 1) * n].sum()


class Trainer:
    """The model, optimizer, schedule and scaler of one rank, and its step."""
    def __init__(self, cfg, num_classes, rank, world_size, device):
        self.cfg, self.world_size, self.device = cfg, world_size, device
        self.dtype = getattr(torch, cfg['dtype'])
        torch.manual_seed(cfg['seed'])  # the same backbone on every rank
        net = d2lf.face_resnet(cfg['depth'], cfg['width'],
                               cfg['embedding_size'], cfg['dropout'])
        self.net = net.to(device, self.dtype)
        self.shard = ClassShard(num_classes, cfg['embedding_size'], rank,
                                world_size, cfg['seed']).to(device, self.dtype)
        # Running statistics stay each rank's own, as arcface_torch keeps them.
        self.model = nn.parallel.DistributedDataParallel(
            self.net, broadcast_buffers=False)
        params = [p for m in (self.net, self.shard) for p in m.parameters()
                  if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, cfg['lr'],
                                         momentum=cfg['momentum'],
                                         weight_decay=cfg['wd'])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda i: d2lf.warmup_cosine(
                i + 1, cfg['num_steps'], cfg['warmup_steps']))
        self.scaler = torch.amp.GradScaler('cuda', enabled=cfg['fp16'])
        self.global_batch = (cfg['batch_per_device'] * cfg['micro_batches']
                             * world_size)

    def step(self, step, parts):
        """One update on this rank's parts of a global batch: the loss sum."""
        cfg, total = self.cfg, 0.0
        self.optimizer.zero_grad(set_to_none=True)
        for m, (X, y) in enumerate(parts):
            X, y = X.to(self.device, self.dtype), y.to(self.device)
            generator = torch.Generator().manual_seed(int(
                onp.random.SeedSequence([cfg['seed'], step, dist.get_rank(),
                                        m]).generate_state(1)[0]))
            last = m == len(parts) - 1
            with contextlib.nullcontext() if last else self.model.no_sync():
                with torch.autocast(self.device.type, torch.float16,
                                    enabled=cfg['fp16']):
                    embeddings = self.model(X)
                loss = part_loss(self.shard, embeddings.to(self.dtype), y,
                                 cfg, self.world_size, generator)
                # DDP averages the backbone's gradients over the ranks: this
                # scale makes them those of the global batch's mean loss.
                self.scaler.scale(
                    loss * self.world_size / self.global_batch).backward()
            total += float(loss)
        for p in self.shard.parameters():  # every rank's loss reached them
            p.grad /= self.world_size
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return total

    def state_dict(self):
        return {'net': self.net.state_dict(), 'shard': self.shard.state_dict(),
                'optimizer': self.optimizer.state_dict(),
                'scheduler': self.scheduler.state_dict(),
                'scaler': self.scaler.state_dict()}

    def load_state_dict(self, state):
        self.net.load_state_dict(state['net'])
        self.shard.load_state_dict(state['shard'])
        self.optimizer.load_state_dict(state['optimizer'])
        self.scheduler.load_state_dict(state['scheduler'])
        if state['scaler']:
            self.scaler.load_state_dict(state['scaler'])


def rng_states():
    """The random states, as tensors and numbers: loaded without pickle."""
    kind, keys, pos, has_gauss, gauss = onp.random.get_state()
    return {'torch': torch.get_rng_state(),
            'numpy': [kind, torch.from_numpy(keys.astype(onp.int64)), pos,
                      has_gauss, gauss],
            'cuda': (torch.cuda.get_rng_state_all()
                     if torch.cuda.is_available() else None)}


def set_rng_states(states):
    torch.set_rng_state(states['torch'])
    kind, keys, pos, has_gauss, gauss = states['numpy']
    onp.random.set_state((kind, keys.numpy().astype(onp.uint32), pos,
                         has_gauss, gauss))
    if states['cuda'] is not None:
        torch.cuda.set_rng_state_all(states['cuda'])


class HashingWriter:
    """A file that computes the SHA-256 of what is written to it."""
    def __init__(self, f, step):
        self.f, self.step, self.sha = f, step, hashlib.sha256()

    def write(self, data):
        written = self.f.write(data)
        self.sha.update(data)
        stall('checkpoint', self.step)  # test hook: midway through a write
        return written

    def flush(self):
        self.f.flush()


def file_digest(path):
    """SHA-256 of a file, or None when it cannot be read."""
    sha = hashlib.sha256()
    try:
        with open(path, 'rb') as f:
            for block in iter(lambda: f.read(1 << 20), b''):
                sha.update(block)
    except OSError:
        return None
    return sha.hexdigest()


def checkpoint_name(step, rank, world_size):
    return f'step{step:09d}-rank{rank}-of-{world_size}.pt'


def save_checkpoint(folder, step, state, rank, world_size, kept):
    """Write this rank's state; rank 0 then lists all ranks' in MANIFEST."""
    os.makedirs(folder, exist_ok=True)
    name = checkpoint_name(step, rank, world_size)
    with publish.writing(os.path.join(folder, name)) as f:
        writer = HashingWriter(f, step)
        torch.save(state, writer)
    digests = [None] * world_size
    dist.all_gather_object(digests, writer.sha.hexdigest())
    kept.append(step)
    if rank == 0:
        # A checkpoint after this step is one a restarted run left behind.
        earlier = [c for c in read_manifest(folder) if c[0] < step]
        listed = earlier[-(KEPT - 1):] + [(step, digests)]
        manifest = {'world_size': world_size, 'checkpoints': [
            {'step': s, 'digests': d} for s, d in listed]}
        with publish.writing(os.path.join(folder, MANIFEST), 'w') as f:
            json.dump(manifest, f)
    dist.barrier()  # the manifest names the new files: the old ones can go
    for old in kept[:-KEPT]:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, checkpoint_name(old, rank,
                                                           world_size)))
    del kept[:-KEPT]


def read_manifest(folder):
    """[(step, digests)] of the checkpoints listed, oldest first."""
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return []
    return [(c['step'], c['digests']) for c in manifest['checkpoints']]


def load_checkpoint(folder, rank, world_size):
    """The newest state whose files are whole on every rank, or None."""
    for step, digests in reversed(read_manifest(folder)):
        if len(digests) != world_size:
            raise ConfigError(f'{folder}: checkpoint of {len(digests)} '
                              f'ranks; this job has {world_size}')
        path = os.path.join(folder, checkpoint_name(step, rank, world_size))
        whole = torch.tensor(int(file_digest(path) == digests[rank]))
        if all_reduce(whole, dist.ReduceOp.MIN):
            # Tensors, numbers and strings only: no code runs (load_tensors).
            return d2lf.load_tensors(path, max_bytes=CHECKPOINT_MAX_BYTES)
        print(f'rank {rank}: checkpoint of step {step} is damaged; '
              f'trying the one before', file=sys.stderr)
    return None


def stall(where, step):
    """Test hook: stop here, once, if STALL_VAR says so (see its comment)."""
    spec = os.environ.get(STALL_VAR, '')
    rank = int(os.environ.get('RANK', 0))
    who, _, point = spec.rpartition('@')
    if point != f'{where}:{step}' or who not in ('', f'rank{rank}'):
        return
    marker = os.path.join(os.environ.get(STALL_VAR + '_DIR', '.'),
                          f'stalled-rank{rank}')
    if os.path.exists(marker):
        return
    with publish.writing(marker, 'w') as f:  # the pid whole, for the test
        f.write(str(os.getpid()))
    while True:
        time.sleep(1)


def float32_copy(net):
    """The network in float32, the type of the images it is shown."""
    return copy.deepcopy(net).float().eval()


def evaluate(net, cfg, device):
    """The multi-set table of every .bin set in the data and val folders."""
    folders = [cfg['data']] + cfg['val_dirs']
    if not d2lf.find_bin_sets(folders):
        return {}
    net, table = float32_copy(net), io.StringIO()
    with torch.no_grad(), contextlib.redirect_stdout(table):
        results = d2lf.evaluate_bin_sets(
            lambda images: d2lf.embed_pairs(net, images, 256, [device]),
            folders)
    tqdm.tqdm.write(table.getvalue().rstrip())  # above the progress bar
    return results


def check_finite(loss, step, rank):
    """Stop, as train_facerec does, at the first loss that is not finite."""
    if not math.isfinite(loss):
        raise d2lf.TrainingDiverged(
            f'rank {rank}: training diverged at step {step}: the loss of its '
            f'part of the batch is {loss}; try a smaller learning rate, a '
            f'longer warm-up or a smaller scale s')


def save_model(net, out, image_size):
    """model.pt (the backbone's state_dict) and model.onnx, in float32."""
    net = float32_copy(net)
    d2lf.save_tensors(net.state_dict(), os.path.join(out, 'model.pt'))
    d2lf.export_onnx(net, os.path.join(out, 'model.onnx'), image_size)


def log_line(step, num_steps, since, trainer, world_size):
    """Rank 0 prints the mean loss and the speed since the last line."""
    total = all_reduce(since)  # the seconds summed over the ranks, too
    if dist.get_rank() == 0:
        tqdm.tqdm.write(
            f'step {step}/{num_steps}: loss {total[0] / total[1]:.3f}, lr '
            f'{trainer.scheduler.get_last_lr()[0]:.4f}, '
            f'{total[1] / total[2] * world_size:.1f} images/s')
    since.zero_()


def resume(trainer, folder, rank, world_size):
    """Load the newest whole checkpoint, if any: the steps it had done."""
    state = load_checkpoint(folder, rank, world_size)
    if state is None:
        return 0
    trainer.load_state_dict(state['trainer'])
    set_rng_states(state['rng'])
    print(f'rank {rank}: resuming after step {state["step"]} (epoch '
          f'{state["sampler"]["epoch"]}, position '
          f'{state["sampler"]["position"]})', file=sys.stderr)
    return state['step']


def train(cfg):
    """Train as configured, in this process as one rank of the job."""
    rank, world_size, device = start_group(cfg)
    reader = load_parts(cfg, rank)
    trainer = Trainer(cfg, reader.num_classes, rank, world_size, device)
    batches = GlobalBatches(len(reader.pack), cfg['batch_per_device'],
                            world_size * cfg['micro_batches'], cfg['seed'])
    folder = os.path.join(cfg['out'], CHECKPOINTS)
    first = resume(trainer, folder, rank, world_size)
    kept = [first] if first else []  # the steps of our checkpoint files
    per_rank = cfg['micro_batches']  # parts of each global batch
    mine = range(rank * per_rank, (rank + 1) * per_rank)
    parts = reader.parts(batches, range(first, cfg['num_steps']), mine)
    bar = tqdm.tqdm(total=cfg['num_steps'], initial=first, disable=rank != 0,
                    unit='step', file=sys.stderr)
    # Since the last line: loss sum, examples, seconds in training steps
    # (waiting for data included; checkpoints and evaluation not).
    since = torch.zeros(3, dtype=torch.float64)
    for step in range(first + 1, cfg['num_steps'] + 1):
        stall('step', step)
        started = time.time()
        loss = trainer.step(step - 1, [next(parts) for _ in mine])
        check_finite(loss, step, rank)
        since += torch.tensor([loss, trainer.global_batch / world_size,
                               time.time() - started])
        bar.update()
        if step % cfg['log_every'] == 0 or step == cfg['num_steps']:
            log_line(step, cfg['num_steps'], since, trainer, world_size)
        if step % cfg['checkpoint_every'] == 0 or step == cfg['num_steps']:
            save_checkpoint(folder, step, {
                'step': step, 'trainer': trainer.state_dict(),
                'sampler': batches.state_dict(step), 'rng': rng_states(),
                'config': cfg}, rank, world_size, kept)
        if rank == 0 and (step % cfg['eval_every'] == 0
                          or step == cfg['num_steps']):
            evaluate(trainer.net, cfg, device)
    bar.close()
    if rank == 0:
        save_model(trainer.net, cfg['out'], reader.image_size)
        print(f'wrote {os.path.join(cfg["out"], "model.pt")} and model.onnx',
              file=sys.stderr)
    dist.barrier()


def main(argv=None):
    die_with_parent()
    cfg = parse_config(argv)
    os.makedirs(cfg['out'], exist_ok=True)
    train(cfg)


if __name__ == '__main__':
    main()
