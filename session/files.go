package session

import (
	"context"
	"errors"

	"github.com/kvmscope/kvmscope/introspect"
)

// ReadCachedFile reads the first n bytes of the guest file at path from
// the guest kernel's page cache, walking the dentry cache from init's
// root (introspect.Kernel.ReadCachedFile): read-only, and only what the
// guest kernel has cached.
func (s *Session) ReadCachedFile(ctx context.Context, path string, n int) (*introspect.CachedFile, error) {
	var f *introspect.CachedFile
	var answer error
	_, err := s.scan(ctx, "file", false, func(k *introspect.Kernel, off *introspect.Offsets) error {
		procs, err := k.Processes(off, introspect.ProcessOptions{NoCmdline: true})
		if err != nil {
			return err
		}
		for _, p := range procs {
			if p.PID == 1 {
				// A file that is not there is an answer, not a failed
				// read: returned here it would make the scan find the
				// kernel again.
				f, answer = k.ReadCachedFile(p.Task, path, n)
				return nil
			}
		}
		answer = errors.New("the guest has no pid 1 yet")
		return nil
	})
	if err == nil {
		err = answer
	}
	return f, err
}
