package session

import (
	"context"
	"fmt"

	"github.com/kvmscope/kvmscope/guestmem"
	"github.com/kvmscope/kvmscope/introspect"
)

// discovery caches what was found of the guest kernel: its image, symbols,
// memory layout, BTF and structure offsets, which stay true while the
// guest runs the same kernel. Nothing read of the kernel's objects is
// cached: every use binds the kernel to that scan's source
// (introspect.Kernel.On), with a page-table cache of its own.
type discovery struct {
	kernel  *introspect.Kernel
	offsets *introspect.Offsets
	offErr  error // the members FindOffsets could not find
}

// get returns the kernel bound to mem, discovering it on mem first when
// nothing is cached. A failed discovery is retried on the next call (the
// guest may still be booting).
func (d *discovery) get(ctx context.Context, mem guestmem.Source) (*introspect.Kernel, *introspect.Offsets, error) {
	if d.kernel == nil {
		// Registers are a cross-check only; discovery works without.
		cpus, _ := mem.CPUs(ctx)
		k, err := introspect.Discover(mem, introspect.DiscoverOptions{CPUs: cpus})
		if err != nil {
			return nil, nil, fmt.Errorf("find the guest kernel: %w", err)
		}
		off, err := introspect.FindOffsets(k)
		if off == nil {
			return nil, nil, fmt.Errorf("find structure offsets: %w", err)
		}
		d.kernel, d.offsets, d.offErr = k, off, err
	}
	return d.kernel.On(mem), d.offsets, nil
}

// forget drops the cache.
func (d *discovery) forget() { *d = discovery{} }
