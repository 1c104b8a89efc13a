package session

import (
	"context"
	"errors"
	"fmt"
	"time"

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

	// Offsets solved without BTF can lack members while the guest boots
	// (no process has the shape yet to single an offset out: creds,
	// before init's first exec). They are solved again, with back-off.
	retryAt time.Time
	retries int
}

// Re-solving missing offsets: after retryFirst, doubling, at most
// maxRetries times (a member some kernels never let the solver find must
// not cost a solve per scan forever).
const (
	retryFirst = 5 * time.Second
	maxRetries = 6
)

// get returns the kernel bound to mem, discovering it on mem first when
// nothing is cached. A failed discovery is retried on the next call (the
// guest may still be booting).
func (d *discovery) get(ctx context.Context, mem guestmem.Source) (*introspect.Kernel, *introspect.Offsets, error) {
	if d.kernel == nil {
		// Registers are a cross-check only; discovery works without.
		cpus, _ := mem.CPUs(ctx)
		if err := inLongMode(cpus); err != nil {
			return nil, nil, fmt.Errorf("find the guest kernel: %w", err)
		}
		k, err := introspect.Discover(mem, introspect.DiscoverOptions{CPUs: cpus})
		if err != nil {
			return nil, nil, fmt.Errorf("find the guest kernel: %w", err)
		}
		off, err := introspect.FindOffsets(k)
		if off == nil {
			return nil, nil, fmt.Errorf("find structure offsets: %w", err)
		}
		d.kernel, d.offsets, d.offErr = k, off, err
		d.retryAt, d.retries = time.Now().Add(retryFirst), 0
	} else if d.offErr != nil && d.retries < maxRetries && time.Now().After(d.retryAt) {
		d.retries++
		d.retryAt = time.Now().Add(retryFirst << d.retries)
		if off, err := introspect.FindOffsets(d.kernel.On(mem)); off != nil && missing(err) < missing(d.offErr) {
			d.offsets, d.offErr = off, err
		}
	}
	return d.kernel.On(mem), d.offsets, nil
}

// inLongMode says why no x86-64 kernel can be running yet when no vCPU
// has EFER.LMA set: the guest is still in its firmware or boot loader.
// Looking for the kernel then would read all of guest memory for nothing,
// and, where guest RAM is a memfd, make the host allocate the pages the
// guest has not touched (a read fault on a hole of a shared memfd
// mapping allocates one). Without registers (nil) the search goes on.
func inLongMode(cpus []guestmem.CPU) error {
	if len(cpus) == 0 {
		return nil
	}
	for _, c := range cpus {
		if c.EFER&guestmem.EFERLMA != 0 {
			return nil
		}
	}
	return fmt.Errorf("no vCPU is in 64-bit mode yet (vCPU %d: %s mode): the guest is still in its firmware or boot loader", cpus[0].ID, cpus[0].Mode())
}

// missing is how many members an error of FindOffsets lacks (0 for nil).
func missing(err error) int {
	if err == nil {
		return 0
	}
	var m *introspect.UnsolvedError
	if errors.As(err, &m) {
		return len(m.Members)
	}
	return 1 << 20
}

// forget drops the cache.
func (d *discovery) forget() { *d = discovery{} }
