/**
 * How replicas reach each other. The sync logic (replica-sync.ts) is the same everywhere; only
 * the transport differs: NATS between processes and machines (nats-transport.ts), an in-memory
 * bus with a delivery delay in the policy lab and in unit tests (memory-transport.ts).
 *
 * Delivery contract, as NATS core gives it: at most once, in order per publisher while
 * connected; a message may be lost across a disconnect. The sync logic numbers its messages
 * and repairs gaps itself.
 */
export interface SyncTransport {
  /** Sends without waiting; false when it could not be sent (not connected). */
  publish(subject: string, data: Uint8Array): boolean;
  /** `queue`: only one subscriber of the group gets each message (NATS queue groups). */
  subscribe(subject: string, handler: (data: Uint8Array) => void, queue?: string): () => void;
  readonly connected: boolean;
  /** Told when the connection is lost and when it is back. */
  onStatus(listener: (connected: boolean) => void): void;
  /** Largest message the transport takes, in bytes. */
  readonly maxPayload: number;
  close(): Promise<void>;
}
