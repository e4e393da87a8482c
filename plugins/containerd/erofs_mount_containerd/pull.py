"""``erofs-mount snapshotter pull``: what CRI does for a remote snapshotter, for ``ctr`` users.

``ctr image pull`` in containerd 1.6 fetches every layer and sends no
remote-snapshot labels. This resolves the reference as ``mount`` would
(credentials, hosts directory, ``insecure``), then, through containerd's
own API and under a lease (nothing is collected half made):

1. writes the manifest and the config into containerd's content store, the
   manifest labelled to keep the config and the config to keep the image's
   top snapshot (containerd's garbage-collection references);
2. prepares each layer's snapshot (its chain ID, as containerd names it)
   with the labels that name the layer, which the snapshotter answers by
   mounting it through erofs-mount (ALREADY_EXISTS: nothing to unpack); a
   layer erofs-mount cannot mount is prepared as an ordinary snapshot, and
   containerd applies it, as ``ctr image pull`` would: its blob is streamed
   into the content store (collected with the lease: the snapshot is what
   stays) and containerd's diff service unpacks it onto the snapshot, which
   is then committed under the chain ID;
3. creates (or moves) the image to that manifest.

``ctr run --snapshotter erofs-mount REF`` then finds the image unpacked.
"""

from __future__ import annotations

import datetime
import hashlib
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grpc
from google.protobuf import field_mask_pb2

from erofs_mount_core import ErofsMountError

from ._api import (
    content_pb2,
    content_pb2_grpc,
    descriptor_pb2,
    diff_pb2,
    diff_pb2_grpc,
    images_pb2,
    images_pb2_grpc,
    leases_pb2,
    leases_pb2_grpc,
    snapshots_pb2,
    snapshots_pb2_grpc,
)
from .layers import IMAGE_LAYERS, IMAGE_REF, LAYER_DIGEST, MANIFEST_DIGEST, SNAPSHOT_REF

LEASE_HOURS = 1  # a pull that dies leaves what it made to the collector after this


class PullError(ErofsMountError):
    """A pull that did not make the image: one line, what failed and where."""


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """containerd's names for the snapshots of an image's layers (``identity.ChainID``)."""
    chain: list[str] = []
    for diff_id in diff_ids:
        chain.append(diff_id if not chain else
                     "sha256:" + hashlib.sha256(f"{chain[-1]} {diff_id}".encode()).hexdigest())
    return chain


def pull_image(reference: str, options: Mapping[str, str], address: str, namespace: str, snapshotter: str) -> str:
    from erofs_mount_oci import resolve_image

    image = resolve_image(reference, options)
    layers, diff_ids = image.layers, image.diff_ids
    if len(diff_ids) != len(layers):
        raise PullError(f"snapshotter pull: {reference}: its config names {len(diff_ids)} layer(s), its manifest "
                        f"{len(layers)}")
    chain = chain_ids(diff_ids)
    with grpc.insecure_channel(f"unix:{address}") as channel:
        calls = _Calls(channel, namespace, address)
        lease = calls.lease()
        try:
            calls.write(image.config_digest, image.config,
                        {f"containerd.io/gc.ref.snapshot.{snapshotter}": chain[-1]} if chain else {})
            calls.write(image.digest, image.manifest, {"containerd.io/gc.ref.content.config": image.config_digest})
            parent = ""
            for n, (layer, chain_id) in enumerate(zip(layers, chain, strict=True)):
                labels = {SNAPSHOT_REF: chain_id, IMAGE_REF: reference, LAYER_DIGEST: layer["digest"],
                          MANIFEST_DIGEST: image.digest, IMAGE_LAYERS: _image_layers(layers[n:])}
                calls.prepare_layer(snapshotter, chain_id, parent, labels, f"layer {n} ({layer['digest']})",
                                    lambda layer=layer: _blob(reference, options, layer))
                parent = chain_id
            calls.image(reference, descriptor_pb2.Descriptor(media_type=image.media_type, digest=image.digest,
                                                             size=len(image.manifest)))
        finally:
            calls.release(lease)
    return reference


def _image_layers(layers: Sequence[dict[str, Any]]) -> str:
    """CRI's ``cri.image-layers``: this layer's digest and the later ones', as many as a label holds."""
    listed: list[str] = []
    for layer in layers:
        if len(IMAGE_LAYERS) + len(",".join([*listed, layer["digest"]])) > 4096:
            break
        listed.append(layer["digest"])
    return ",".join(listed)


def _blob(reference: str, options: Mapping[str, str], layer: dict[str, Any]) -> tuple[Any, Iterator[bytes]]:
    """A layer's descriptor (as containerd's) and its bytes, for containerd to apply."""
    from erofs_mount_oci import blob_chunks

    descriptor = descriptor_pb2.Descriptor(media_type=str(layer.get("mediaType", "")), digest=layer["digest"],
                                           size=layer["size"])
    return descriptor, blob_chunks(reference, options, layer["digest"], int(layer["size"]))


class _Calls:
    """containerd's API under one namespace (and, once made, one lease), each failure one line."""

    def __init__(self, channel: grpc.Channel, namespace: str, address: str) -> None:
        self.metadata: list[tuple[str, str]] = [("containerd-namespace", namespace)]
        self.address = address
        self.content = content_pb2_grpc.ContentStub(channel)
        self.images = images_pb2_grpc.ImagesStub(channel)
        self.leases = leases_pb2_grpc.LeasesStub(channel)
        self.snapshots = snapshots_pb2_grpc.SnapshotsStub(channel)
        self.diff = diff_pb2_grpc.DiffStub(channel)

    def _call(self, what: str, method: Any, request: Any, *, ok: tuple[grpc.StatusCode, ...] = ()) -> Any:
        try:
            return method(request, metadata=self.metadata, timeout=900)
        except grpc.RpcError as exc:
            if exc.code() in ok:
                return None
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                raise PullError(f"snapshotter pull: containerd does not answer at {self.address}") from None
            raise PullError(f"snapshotter pull: {what}: {exc.details()}") from None

    def lease(self) -> str:
        expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=LEASE_HOURS)
        made = self._call("a lease", self.leases.Create, leases_pb2.CreateRequest(
            labels={"containerd.io/gc.expire": expires.strftime("%Y-%m-%dT%H:%M:%SZ")}))
        self.metadata.append(("containerd-lease", made.lease.id))
        return made.lease.id

    def release(self, lease: str) -> None:
        self.metadata = [m for m in self.metadata if m[0] != "containerd-lease"]
        self._call("the lease", self.leases.Delete, leases_pb2.DeleteRequest(id=lease),
                   ok=(grpc.StatusCode.NOT_FOUND,))

    def write(self, digest: str, body: bytes | Iterator[bytes], labels: dict[str, str], size: int = -1) -> None:
        """``body`` (bytes, or chunks of ``size`` bytes in all) into the content store (kept as it is there
        already), with ``labels``; containerd checks it against ``digest`` as it commits it."""
        chunks = iter([body]) if isinstance(body, bytes) else body
        total = len(body) if isinstance(body, bytes) else size

        failed: list[BaseException] = []  # what stopped the chunks (gRPC says only that the stream broke)

        def requests() -> Iterator[Any]:
            ref, offset = f"erofs-mount-pull-{digest}", 0
            try:
                for chunk in chunks:
                    yield content_pb2.WriteContentRequest(action=content_pb2.WRITE, ref=ref, total=total,
                                                          expected=digest, offset=offset, data=chunk)
                    offset += len(chunk)
            except Exception as exc:
                failed.append(exc)
                raise
            yield content_pb2.WriteContentRequest(action=content_pb2.COMMIT, ref=ref, total=total,
                                                  expected=digest, offset=offset, labels=labels)
        try:
            for _ in self.content.Write(requests(), metadata=self.metadata, timeout=900):
                pass
        except grpc.RpcError as exc:
            if failed:
                raise failed[0] from None
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise PullError(f"snapshotter pull: content {digest}: {exc.details()}") from None
            info = content_pb2.Info(digest=digest, labels=labels)
            self._call(f"content {digest}", self.content.Update, content_pb2.UpdateRequest(
                info=info, update_mask=field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels])))

    def prepare_layer(self, snapshotter: str, chain_id: str, parent: str, labels: dict[str, str], what: str,
                      blob: Callable[[], tuple[Any, Iterator[bytes]]]) -> None:
        """The layer's snapshot, named ``chain_id``: there already, mounted by the snapshotter now, or (one
        erofs-mount could not mount) applied by containerd from ``blob``."""
        if self._call(what, self.snapshots.Stat, snapshots_pb2.StatSnapshotRequest(
                snapshotter=snapshotter, key=chain_id), ok=(grpc.StatusCode.NOT_FOUND,)) is not None:
            return
        key = f"extract-{uuid.uuid4().hex} {chain_id}"
        made = self._call(what, self.snapshots.Prepare, snapshots_pb2.PrepareSnapshotRequest(
            snapshotter=snapshotter, key=key, parent=parent, labels=labels), ok=(grpc.StatusCode.ALREADY_EXISTS,))
        if made is None:
            return
        try:  # prepared as an ordinary snapshot: erofs-mount could not mount the layer (its log says why)
            descriptor, chunks = blob()
            self.write(descriptor.digest, chunks, {}, descriptor.size)
            self._call(f"{what}: applying it", self.diff.Apply, diff_pb2.ApplyRequest(diff=descriptor,
                                                                                       mounts=made.mounts))
            self._call(what, self.snapshots.Commit, snapshots_pb2.CommitSnapshotRequest(
                snapshotter=snapshotter, name=chain_id, key=key))
        except BaseException:
            self._call(what, self.snapshots.Remove, snapshots_pb2.RemoveSnapshotRequest(
                snapshotter=snapshotter, key=key), ok=(grpc.StatusCode.NOT_FOUND,))
            raise

    def image(self, name: str, target: Any) -> None:
        image = images_pb2.Image(name=name, target=target)
        if self._call(f"image {name}", self.images.Create, images_pb2.CreateImageRequest(image=image),
                      ok=(grpc.StatusCode.ALREADY_EXISTS,)) is None:
            self._call(f"image {name}", self.images.Update, images_pb2.UpdateImageRequest(
                image=image, update_mask=field_mask_pb2.FieldMask(paths=["target"])))
