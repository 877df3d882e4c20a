"""What the machine module sets for the process: the heap kept for large tensors."""
import resource
import sys

import pytest
import torch

from zoolib import machine

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or machine.glibc() is None,
                                reason="glibc's mallopt only")


def _faults_of_second_allocation(mb: int = 64) -> int:
    """Page faults of allocating and touching `mb` MB again right after freeing as much."""
    torch.ones(mb * 2**18)  # float32: mb MB, freed at once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(mb * 2**18)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_a_kept_heap_reuses_the_pages_of_large_tensors_and_restores_the_default():
    pages = 64 * 2**20 // resource.getpagesize()
    machine.glibc().malloc_trim(0)  # whatever earlier tests left free in the heap goes back
    assert _faults_of_second_allocation() > pages // 2  # glibc: a fresh mmap each time
    with machine.kept_heap():
        _faults_of_second_allocation()  # the heap grows once
        assert _faults_of_second_allocation() < pages // 10
    assert _faults_of_second_allocation() > pages // 2  # the default again
    machine.glibc().malloc_trim(0)  # whatever earlier tests left free in the heap goes back
    with machine.kept_heap(on=False):
        assert _faults_of_second_allocation() > pages // 2
