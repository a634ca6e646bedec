"""``splitlearn_async.client``'s public face: ``__all__`` is complete, sorted and resolves."""

from __future__ import annotations

import types

import splitlearn_async
from splitlearn_async import client


def test_client_all_is_complete_and_sorted():
    public = {n for n, v in vars(client).items() if not n.startswith("_") and not isinstance(v, types.ModuleType)}
    assert set(client.__all__) == public
    assert client.__all__ == sorted(client.__all__)


def test_the_package_exports_the_client_names_it_lists():
    for name in client.__all__:
        if name in splitlearn_async.__all__:
            assert getattr(splitlearn_async, name) is getattr(client, name), name


def test_remote_trunk_keeps_its_import_paths():
    from splitlearn_async.client._remote import RemoteTrunk, RemoteTrunkSession

    assert RemoteTrunk is client.RemoteTrunk
    assert RemoteTrunkSession is client.RemoteTrunkSession
