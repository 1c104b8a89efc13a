package api

import (
	"context"
	"errors"
	"net/http"
	"strconv"
	"time"

	"github.com/kvmscope/kvmscope/introspect"
)

// getFile reads the first bytes of a guest file from the guest kernel's
// page cache (session.ReadCachedFile): 404 when the dentry cache has no
// such path, 422 for anything else kvmscope cannot read.
func (s *Server) getFile(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	n := 4096
	if b := q.Get("bytes"); b != "" {
		v, err := strconv.Atoi(b)
		if err != nil || v <= 0 || v > 1<<20 {
			httpError(w, http.StatusBadRequest, "bytes: want 1 to 1048576")
			return
		}
		n = v
	}
	ctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
	defer cancel()
	f, err := s.Session.ReadCachedFile(ctx, q.Get("path"), n)
	if err != nil {
		status := http.StatusUnprocessableEntity
		if errors.Is(err, introspect.ErrNotCached) {
			status = http.StatusNotFound
		}
		httpError(w, status, err.Error())
		return
	}
	writeJSON(w, f)
}
