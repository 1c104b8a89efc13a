package introspect

import "fmt"

// credIDs holds the eight ids at the start of struct cred's id block, in
// declaration order (include/linux/cred.h, unchanged since 2.6.29): uid,
// gid, suid, sgid, euid, egid, fsuid, fsgid.
const credIDs = 8

// idPattern reports whether the eight u32 ids at off in a cred follow the
// pattern of a process that did not change ids partially: the four user
// ids (uid, suid, euid, fsuid at off, +8, +16, +24) equal each other and
// the four group ids (off+4, +12, +20, +28) equal each other.
func idPattern(b []byte, off int) (uid, gid uint32, ok bool) {
	if off+4*credIDs > len(b) {
		return 0, 0, false
	}
	uid, gid = le32(b, off), le32(b, off+4)
	for i := 0; i < credIDs; i += 2 {
		if le32(b, off+4*i) != uid || le32(b, off+4*i+4) != gid {
			return 0, 0, false
		}
	}
	return uid, gid, true
}

// solveCred finds task_struct.real_cred and cred, and the uid/gid/euid/
// egid offsets in struct cred, together: in every task a kernel pointer
// (init_task's to init_cred when kallsyms has it) to a struct in which,
// at one offset, eight u32 ids are all 0 for init_task and the kernel
// threads, follow idPattern in at least 90% of tasks and are non-zero in
// at least one. A guest whose processes all run as root cannot decide
// the cred members; they are then left unknown.
func (s *solver) solveCred() error {
	initCred, haveInitCred := s.k.Symbol("init_cred")
	type found struct{ ptr, id int }
	var fs []found
	var ptrs []candidate
	win := s.minWindow()
	for o := 0; o+8 <= win; o += 8 {
		if err := s.charge(len(s.tasks) + 1); err != nil {
			return err
		}
		if haveInitCred && le64(s.init.b, o) != initCred {
			continue
		}
		ok := true
		for _, t := range s.tasks {
			if !s.k.kernelPtr(le64(t.b, o)) {
				ok = false
				break
			}
		}
		if !ok {
			continue
		}
		// Read each distinct cred once.
		creds := make(map[uint64][]byte)
		for _, t := range s.tasks {
			p := le64(t.b, o)
			if _, done := creds[p]; done {
				continue
			}
			b, err := s.read(p, credWindow)
			if err != nil {
				ok = false
				break
			}
			creds[p] = b
			if len(creds) > maxTasks {
				ok = false
				break
			}
		}
		if !ok {
			continue
		}
		for id := 4; id+4*credIDs <= credWindow; id += 4 {
			if err := s.charge(len(s.tasks) + 8*len(s.kthreads)); err != nil {
				return err
			}
			zero := true
			for _, t := range s.kthreads {
				for i := range credIDs {
					if le32(creds[le64(t.b, o)], id+4*i) != 0 {
						zero = false
					}
				}
			}
			if !zero {
				continue
			}
			match, nonRoot := 0, 0
			for _, t := range s.tasks {
				uid, gid, ok := idPattern(creds[le64(t.b, o)], id)
				if ok {
					match++
					if uid != 0 || gid != 0 {
						nonRoot++
					}
				}
			}
			if match*10 >= len(s.tasks)*9 && nonRoot > 0 {
				fs = append(fs, found{o, id})
			}
		}
	}
	// Group by pointer offset: real_cred and cred point to the same cred.
	ids := map[int]bool{}
	for _, f := range fs {
		ids[f.id] = true
		vals := make([]uint64, 0, len(s.tasks))
		for _, t := range s.tasks {
			vals = append(vals, le64(t.b, f.ptr))
		}
		ptrs = append(ptrs, candidate{off: f.ptr, vals: vals})
	}
	if len(fs) == 0 {
		return &UnsolvedError{Members: map[string]string{
			"task_struct.cred": "no pointer leads to an id block that is 0 for kernel threads and non-zero for some task (are all processes root?)",
			"cred.uid":         "see task_struct.cred",
		}}
	}
	if len(ids) != 1 {
		return fmt.Errorf("cred.uid: %w: several id blocks fit", ErrAmbiguous)
	}
	id := fs[0].id
	var rc, c candidate
	if len(ptrs) == 1 {
		// Only one pointer: cred differs from real_cred somewhere
		// (override_creds) or the kernel has one; call it cred.
		c = ptrs[0]
		s.off.TaskCred = solved(c.off, "the only pointer to a struct with the uid/gid block")
	} else {
		var err error
		rc, c, err = twins("task_struct.real_cred/cred", ptrs, 8)
		if err != nil {
			return err
		}
		s.off.TaskRealCred = solved(rc.off, "pointer to the struct with the uid/gid block; equal to cred on every task, declared first")
		s.off.TaskCred = solved(c.off, "same pointer as real_cred on every task; declared right after it")
	}
	how := "block of eight u32 ids: 0 in kernel threads, pattern uid=suid=euid=fsuid, gid=sgid=egid=fsgid in >=90% of tasks, non-zero in some"
	s.off.CredUID = solved(id, how+"; uid is the block's first")
	s.off.CredGID = solved(id+4, "second id of the block (declaration order)")
	s.off.CredEUID = solved(id+16, "fifth id of the block (declaration order: uid gid suid sgid euid)")
	s.off.CredEGID = solved(id+20, "sixth id of the block (declaration order)")
	return nil
}
