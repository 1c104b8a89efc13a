package api

import (
	"context"
	"fmt"
	"net/url"
	"strconv"

	"github.com/kvmscope/kvmscope/guestmem"
)

// RemoteMemory is a VM's guest physical memory read over the API, for
// tools that run outside the kvmscope process (kvmscope dump).
type RemoteMemory struct {
	c       *Client
	ctx     context.Context
	regions []guestmem.Region
}

// NewRemoteMemory returns the memory of the VM served at c, with the
// memory map as the API reports it now.
func NewRemoteMemory(ctx context.Context, c *Client) (*RemoteMemory, error) {
	var vm VM
	if err := c.Get(ctx, "/v1/vm", &vm); err != nil {
		return nil, err
	}
	m := &RemoteMemory{c: c, ctx: ctx}
	for _, r := range vm.Regions {
		m.regions = append(m.regions, guestmem.Region{GPA: uint64(r.GPA), Size: uint64(r.Size), ReadOnly: r.ReadOnly, Name: r.Name})
	}
	return m, nil
}

// Regions lists the guest's memory regions.
func (m *RemoteMemory) Regions() []guestmem.Region { return m.regions }

// ReadAt reads guest physical memory in requests of at most MaxMemoryRead.
func (m *RemoteMemory) ReadAt(p []byte, gpa int64) (int, error) {
	done := 0
	for done < len(p) {
		n := min(len(p)-done, MaxMemoryRead)
		q := url.Values{"gpa": {fmt.Sprintf("%#x", uint64(gpa)+uint64(done))}, "len": {strconv.Itoa(n)}}
		b, err := m.c.GetRaw(m.ctx, "/v1/memory?"+q.Encode())
		if err != nil {
			return done, err
		}
		if len(b) != n {
			return done, fmt.Errorf("short read from the API: %d of %d bytes", len(b), n)
		}
		done += copy(p[done:], b)
	}
	return done, nil
}
