//go:build linux && amd64

package launch

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/kvmscope/kvmscope/api"
	"github.com/kvmscope/kvmscope/internal/eventlog"
	"github.com/kvmscope/kvmscope/session"
	"github.com/kvmscope/kvmscope/tracer"
	"github.com/kvmscope/kvmscope/tracer/handoff"
	"github.com/rs/zerolog"
)

// runAnalysis is the analysis process: started by the keeper (the tracer's
// process, supervise.go) with its socket to the keeper and the API
// socket's listener, it reads the guest, judges it and serves the API
// until QEMU is gone. Everything that parses guest memory runs here, so
// when it crashes the keeper starts a new one and QEMU never notices.
func runAnalysis(o Options, qa QEMUArgs, ts tracerStage) (int, error) {
	closeInheritedFDs(analysisConnFD, analysisAPIFD, analysisBoardFD)
	dir := socketDir(o)
	log, closeLog := processLog(o, qa, dir, true)
	defer closeLog()
	name := vmName(qa, ts)
	if qa.Name == "" {
		log = log.With().Str("vm", name).Logger()
	}
	log = log.With().Str("part", "analysis").Logger()
	// The OOM killer should pick us before QEMU or the tracer: we are the
	// part that can start again.
	os.WriteFile("/proc/self/oom_score_adj", []byte("500"), 0)

	conn, err := net.FileConn(os.NewFile(analysisConnFD, "keeper"))
	if err != nil {
		log.Error().Err(err).Msg("analysis: no socket to the tracer")
		return 1, nil
	}
	ln, err := net.FileListener(os.NewFile(analysisAPIFD, "api"))
	if err != nil {
		log.Error().Err(err).Msg("analysis: no API socket")
		return 1, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	keeper, err := handoff.Dial(ctx, conn)
	cancel()
	if err != nil {
		log.Error().Err(err).Msg("analysis")
		return 1, nil
	}
	defer keeper.Close()
	// fd 5 is the board only if the keeper made one; else it may be any
	// fd of ours (the runtime's), which a File must not take.
	if l, _ := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", analysisBoardFD)); !strings.HasPrefix(l, "/memfd:kvmscope-regs") {
		log.Debug().Msg("no register board: registers through the tracer's process")
	} else if board, err := tracer.OpenRegsBoard(os.NewFile(analysisBoardFD, "kvmscope-regs")); err != nil {
		log.Warn().Err(err).Msg("register board: registers through the tracer's process")
	} else {
		defer board.Close()
		keeper.UseBoard(board)
	}
	sock, err := socketOf(o, dir, name)
	if err != nil {
		log.Error().Err(err).Msg("analysis")
		return 1, nil
	}
	logs, err := openVMLogs(sock)
	if err != nil {
		log.Error().Err(err).Msg("API disabled")
		return 1, nil
	}
	defer logs.Close()

	signal.Ignore(syscall.SIGPIPE)

	ctx, cancel = context.WithCancel(context.Background())
	defer cancel()
	go func() { <-keeper.Done(); cancel() }()
	// The policy the tracer enforces (tracerOptions): none is refused
	// while it learns.
	enforced := o.Policy
	if o.LearnTo != "" {
		enforced = nil
	}
	target := newRunTarget(keeper, qa, o.AllowWrite, ts.qmpPath, enforced, log)
	target.name = qa.Name
	sess := session.New(target, nil)
	server := &api.Server{Target: target, Session: sess, Log: log, Groups: o.Groups, Events: logs.events, Blocked: logs.blocked, BaselinePath: BaselinePath(sock),
		GuardAllowed: o.Guard || o.AllowWrite}
	go pumpEvents(ctx, keeper, logs.events, log)
	go pumpBlocked(ctx, keeper, logs.queue)
	go logs.queue.record(ctx, sess, logs.blocked, logs.events, log)
	if o.Guard {
		go armGuard(ctx, keeper.Done(), sess, BaselinePath(sock), logs.events, log)
	}
	watch := o.Judging.start(ctx, server, ts.pid, log)
	if err := server.Serve(ln); err != nil {
		log.Error().Err(err).Msg("API disabled")
		return 1, nil
	}
	go target.connectQMP(keeper.Done())
	log.Debug().Int("keeper", keeper.KeeperPid()).Msg("analysis process serving the API")

	code := 0
	stop := stopSignals(watch)
	for waiting := true; waiting; {
		select {
		case s := <-stop:
			// Someone stopped us: the keeper starts another.
			log.Info().Str("signal", s.String()).Msg("analysis process stopping")
			code, waiting = 1, false
		case <-keeper.Done():
			if err := keeper.Err(); err != nil {
				log.Error().Err(err).Msg("analysis: lost the tracer")
				code = 1
			}
			waiting = false
		}
	}
	server.Close()
	target.live.Close()
	select {
	case <-target.tcgReady:
		target.tcg.Close()
	default:
	}
	return code, nil
}

// pumpEvents appends the tracer's events, which the keeper queued, to the
// event log.
func pumpEvents(ctx context.Context, k *handoff.Client, events *eventlog.Log, log zerolog.Logger) {
	for ctx.Err() == nil {
		evs, err := k.TakeEvents(ctx)
		if err != nil {
			return
		}
		if evs.Dropped > 0 {
			events.Append("events_dropped", map[string]uint64{"count": evs.Dropped})
		}
		for _, e := range evs.Events {
			if _, err := events.Append(e.Kind, json.RawMessage(e.Fields)); err != nil {
				log.Error().Err(err).Msg("event log")
			}
		}
	}
}

// pumpBlocked hands the guard's reports, which the keeper queued, to q.
func pumpBlocked(ctx context.Context, k *handoff.Client, q *blockedQueue) {
	for ctx.Err() == nil {
		b, err := k.TakeBlocked(ctx)
		if err != nil {
			return
		}
		q.dropped.Add(b.Dropped)
		for _, w := range b.Writes {
			q.push(w)
		}
	}
}
