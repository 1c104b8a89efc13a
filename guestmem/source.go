package guestmem

import "context"

// Source is a whole guest as one memory source sees it: its physical memory
// and its vCPUs.
type Source interface {
	Memory
	// CPUs returns the registers of every vCPU, as fresh as the source
	// can make them.
	CPUs(ctx context.Context) ([]CPU, error)
}
