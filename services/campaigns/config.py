from services.runtime.settings import GrpcServiceSettings


class CampaignsSettings(GrpcServiceSettings):
    service_name: str = "campaigns"
    accounts_addr: str = "127.0.0.1:50051"
    dispatcher_addr: str = "127.0.0.1:50053"
