package api

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strconv"
	"time"

	"github.com/kvmscope/kvmscope/guestmem"
	"github.com/kvmscope/kvmscope/session"
	"github.com/kvmscope/kvmscope/tracer"
)

// putRegisters writes general registers or MSRs of one vCPU (PUT
// /v1/registers?vcpu=N, body {"rax":"0x1",...}); the reply is the
// session.RegisterWrite its event records.
func (s *Server) putRegisters(w http.ResponseWriter, r *http.Request) {
	vcpu, err := strconv.Atoi(r.URL.Query().Get("vcpu"))
	if err != nil || vcpu < 0 {
		httpError(w, http.StatusBadRequest, "vcpu=N is required (a vCPU id, see GET /v1/vm)")
		return
	}
	body, err := readBody(w, r)
	if err != nil {
		httpError(w, http.StatusRequestEntityTooLarge, err.Error())
		return
	}
	var req map[string]Hex64
	if err := json.Unmarshal(body, &req); err != nil {
		httpError(w, http.StatusBadRequest, `body: want a JSON object of registers, e.g. {"rax":"0x1"}: `+err.Error())
		return
	}
	set := make(map[string]uint64, len(req))
	for name, v := range req {
		set[name] = uint64(v)
	}
	ctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
	defer cancel()
	rw, err := s.Session.WriteRegisters(ctx, vcpu, set)
	if err != nil {
		status := http.StatusBadRequest
		switch {
		case errors.Is(err, guestmem.ErrReadOnly):
			status = http.StatusForbidden
		case errors.Is(err, tracer.ErrNoVCPU):
			status = http.StatusNotFound
		case errors.Is(err, session.ErrNoRegisterWrites):
			status = http.StatusUnprocessableEntity
		case errors.Is(err, tracer.ErrVCPUBusy), errors.Is(err, session.ErrWriteDuringAction):
			status = http.StatusConflict
		}
		httpError(w, status, err.Error())
		return
	}
	s.Log.Info().Int("vcpu", vcpu).Interface("new", rw.New).Msg("vCPU registers written through the API")
	writeJSON(w, rw)
}

// PutJSON sends in as JSON to path (PUT /v1/registers?vcpu=N) and decodes
// the JSON reply into out.
func (c *Client) PutJSON(ctx context.Context, path string, in, out any) error {
	return c.sendJSON(ctx, http.MethodPut, path, in, out)
}
